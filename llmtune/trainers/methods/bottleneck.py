"""Bottleneck adapters (LLM-Adapters, Hu et al. 2023, arXiv 2304.01933), our own implementation.

A bottleneck adapter is ``A(x) = s · W_up f(W_down x)`` with ``W_down: d -> b``, ``W_up: b -> d``, a
non-linearity ``f`` and a scaling ``s``. It is placed after a sub-layer ``F`` (the attention block or the MLP
block of each decoder layer):

* **series** (Houlsby et al. 2019): ``y = F(x) + A(F(x))``  — the adapter reads the sub-layer's output;
* **parallel** (He et al. 2022): ``y = F(x) + A(x)``  — the adapter reads the sub-layer's input.

``W_up`` starts at zero, so at step 0 the adapted model computes exactly what the base computes.

Injection: a forward hook on each decoder layer's ``self_attn`` / ``mlp`` module (what "wrapping" means here),
with the adapter registered as that module's child ``bottleneck_adapter``. The base modules keep their class
and their parameter names (a quantized ``Linear4bit`` stays untouched), so the same code works on a bnb NF4
base; only the adapter's parameters train. Saved as ``bottleneck_model.safetensors`` + ``bottleneck_config.json``.

A bottleneck adapter cannot be merged into the base weights (``f`` is non-linear): `merge_bottleneck` raises
`MergeNotSupportedError`. It is not offered on the Unsloth backend: Unsloth's fast decoding paths call its own
attention/MLP kernels on the layer's weights directly instead of the modules, so hooks would be skipped at
generation time and the adapter silently ignored.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llmtune.core.errors import ConfigError, InvalidOptionError, MergeNotSupportedError
from llmtune.trainers.methods.base import Method
from llmtune.trainers.methods.bottleneck_options import (  # noqa: F401  (re-exported)
    ADAPTER_ATTR,
    CONFIG_FILE,
    FORMAT_VERSION,
    NON_LINEARITIES,
    PLACEMENTS,
    SITE_MODULES,
    SITES,
    WEIGHTS_FILE,
    BottleneckOptions,
    from_trainer_options,
)


def parameter_count(options: BottleneckOptions, hidden_size: int, num_layers: int) -> int:
    """Trainable parameters: ``L · |sites| · (2·d·b + [b + d if bias])``."""
    d, b = hidden_size, options.size
    per_adapter = 2 * d * b + ((b + d) if options.bias else 0)
    return num_layers * len(options.sites) * per_adapter


def _activation(name: str) -> nn.Module:
    return {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}[name]()


class BottleneckAdapter(nn.Module):
    """``A(x) = s · W_up f(W_down dropout(x))``; W_up (and its bias) start at zero."""

    def __init__(self, hidden_size: int, options: BottleneckOptions, *, device: Any = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, options.size, bias=options.bias, device=device, dtype=dtype)
        self.act = _activation(options.non_linearity)
        self.dropout = nn.Dropout(options.dropout)
        self.up = nn.Linear(options.size, hidden_size, bias=options.bias, device=device, dtype=dtype)
        self.scaling = float(options.scaling)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        if self.down.bias is not None:
            nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        if self.up.bias is not None:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        out = self.up(self.act(self.down(self.dropout(x.to(dtype)))))
        return (out * self.scaling).to(x.dtype)


def _hook(placement: str) -> Any:
    """The forward hook that adds ``A(.)`` to a sub-layer's output (the first element of a tuple output)."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        adapter = getattr(module, ADAPTER_ATTR)
        hidden = output[0] if isinstance(output, tuple) else output
        if placement == "series":
            source = hidden
        else:
            source = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if not isinstance(source, torch.Tensor):
                raise RuntimeError(f"parallel bottleneck adapter: {type(module).__name__} was called without a "
                                   "hidden-states tensor to read")
        hidden = hidden + adapter(source)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every decoder layer: a module with both a ``self_attn`` and an ``mlp`` child."""
    found = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if all(isinstance(children.get(m), nn.Module) for m in SITE_MODULES.values()):
            found.append((name, module))
    return found


def hidden_size_of(model: nn.Module) -> int:
    """The residual-stream width ``d`` (``config.hidden_size``, of the text config for multimodal models)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    if not isinstance(size, int):
        raise ConfigError(f"{type(model).__name__} has no config.hidden_size: cannot size bottleneck adapters")
    return size


def _site_modules(model: nn.Module, sites: tuple[str, ...]) -> Iterator[tuple[str, nn.Module]]:
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no decoder layers with 'self_attn' and 'mlp' children; "
                          "bottleneck adapters support Hugging Face causal LMs such as Llama, Mistral, Qwen2")
    for name, layer in layers:
        for site in sites:
            child = SITE_MODULES[site]
            yield f"{name}.{child}", getattr(layer, child)


def inject_bottleneck(model: nn.Module, options: BottleneckOptions | None = None) -> list[str]:
    """Add a bottleneck adapter after every chosen sub-layer of ``model`` (in place); returns the module names.

    The adapters are fp32 (computed in fp32 and cast back to the sub-layer's dtype), on each sub-layer's device.
    Base parameters are left as they are (freeze them yourself, as the trainer does).
    """
    options = options or BottleneckOptions()
    if getattr(model, "_llmtune_bottleneck", None):
        raise ConfigError(f"{type(model).__name__} already has bottleneck adapters; call remove_bottleneck first")
    d = hidden_size_of(model)
    names = []
    for name, module in _site_modules(model, options.sites):
        ref = next(module.parameters(), None)
        device = ref.device if ref is not None else None
        module.add_module(ADAPTER_ATTR, BottleneckAdapter(d, options, device=device))
        handle = module.register_forward_hook(_hook(options.placement), with_kwargs=True)
        module.__dict__["_llmtune_bottleneck_handle"] = handle
        names.append(name)
    model._llmtune_bottleneck = {"options": options, "modules": names, "placement": options.placement}  # type: ignore[assignment]
    return names


def remove_bottleneck(model: nn.Module) -> None:
    """Take the adapters out again (hooks and parameters); the model is its base again."""
    info = getattr(model, "_llmtune_bottleneck", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no bottleneck adapters to remove")
    for name in info["modules"]:
        module = model.get_submodule(name)
        handle = module.__dict__.pop("_llmtune_bottleneck_handle")
        handle.remove()
        delattr(module, ADAPTER_ATTR)
    del model._llmtune_bottleneck


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed by their names in ``model`` (``...mlp.bottleneck_adapter.down.weight``)."""
    # Not ``model.state_dict()``: on AVX512-BF16 CPUs bitsandbytes 0.50 re-packs a Linear4bit's weight in place
    # on an eval forward and back when asked for its state dict, which changed the base's outputs by ~2e-3 on a
    # tiny Llama (llmtune's bnb guard now turns that repacking off, a model quantized elsewhere may not have it
    # off); reading only the adapters never touches the base.
    out: dict[str, torch.Tensor] = {}
    for name in getattr(model, "_llmtune_bottleneck", {}).get("modules", []):
        adapter = model.get_submodule(f"{name}.{ADAPTER_ATTR}")
        out.update(adapter.state_dict(prefix=f"{name}.{ADAPTER_ATTR}."))
    return out


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what trains)."""
    marker = f".{ADAPTER_ATTR}."
    return [p for n, p in model.named_parameters() if marker in f".{n}"]


def _name_or_path(model: nn.Module) -> str | None:
    """Where the base was loaded from (``config._name_or_path``), if it was loaded from somewhere."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def save_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write ``bottleneck_model.safetensors`` and ``bottleneck_config.json`` to ``directory``."""
    from safetensors.torch import save_file

    info = getattr(model, "_llmtune_bottleneck", None)
    if not info:
        raise ConfigError(f"{type(model).__name__} has no bottleneck adapters to save")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"method": "bottleneck", "format_version": FORMAT_VERSION, "options": info["options"].to_dict(),
              "hidden_size": hidden_size_of(model), "modules": info["modules"],
              "base_model_class": type(model).__name__, "base_model_name_or_path": _name_or_path(model),
              "trainable_parameters": sum(t.numel() for t in tensors.values())}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out


def is_bottleneck_dir(directory: str | os.PathLike[str]) -> bool:
    """True for a directory `save_bottleneck` wrote."""
    return (Path(directory) / CONFIG_FILE).is_file()


def read_bottleneck_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved config, validated (its options become a `BottleneckOptions`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (not a bottleneck adapter directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    if config.get("method") != "bottleneck" or config.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path}: field 'method'/'format_version': expected 'bottleneck' / {FORMAT_VERSION}, got "
                          f"{config.get('method')!r} / {config.get('format_version')!r}")
    try:
        config["options"] = BottleneckOptions(**config["options"])
    except (KeyError, TypeError, InvalidOptionError) as exc:
        raise ConfigError(f"{path}: field 'options': {exc}") from None
    return config


def load_bottleneck(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Inject the saved adapters into ``model`` (the same base) and load their weights; returns ``model``."""
    config = read_bottleneck_config(directory)
    if hidden_size_of(model) != config["hidden_size"]:
        raise ConfigError(f"{Path(directory) / CONFIG_FILE}: field 'hidden_size': the adapter was trained on width "
                          f"{config['hidden_size']}, this {type(model).__name__} has {hidden_size_of(model)}")
    names = inject_bottleneck(model, config["options"])
    if names != config["modules"]:
        remove_bottleneck(model)
        raise ConfigError(f"{Path(directory) / CONFIG_FILE}: field 'modules': saved for {len(config['modules'])} "
                          f"sub-layers, this model has {len(names)}; load it on the base it was trained on")
    try:
        load_bottleneck_weights(model, directory)
    except ConfigError:
        remove_bottleneck(model)
        raise
    return model


def load_bottleneck_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Copy saved adapter weights into the adapters already injected in ``model`` (e.g. to resume training)."""
    from safetensors.torch import load_file

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (not a bottleneck adapter directory)")
    weights = load_file(str(path))
    expected = adapter_state_dict(model)
    if set(weights) != set(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        extra = sorted(set(weights) - set(expected))[:3]
        raise ConfigError(f"{path}: tensors do not match the model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for key, tensor in weights.items():
            if tensor.shape != expected[key].shape:
                raise ConfigError(f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, the model's adapter "
                                  f"{tuple(expected[key].shape)}")
            expected[key].copy_(tensor)


def merge_bottleneck(model: nn.Module | None = None) -> nn.Module:
    """Always raises: ``W_up f(W_down x)`` is not linear in ``x``, so no base weight can absorb it."""
    raise MergeNotSupportedError(
        "bottleneck adapters cannot be merged into the base weights: the adapter applies a non-linearity "
        "f(W_down x), which no change of a linear layer reproduces; load the adapter at inference "
        "(llmtune.trainers.methods.bottleneck.load_bottleneck) instead")


class Bottleneck(Method):
    """The recipe's ``bottleneck`` method: adapters injected in place (hooks), saved in llmtune's own format."""

    name: ClassVar[str] = "bottleneck"

    def apply(self, model: Any, options: Any) -> Any:
        inject_bottleneck(model, from_trainer_options(options))
        return model

    def save(self, model: Any, path: Path) -> None:
        save_bottleneck(model, path)

    def load_weights(self, model: Any, path: Path) -> None:
        load_bottleneck_weights(model, path)
