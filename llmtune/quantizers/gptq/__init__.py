"""GPTQ and RTN quantizers, backend ``llmtune``: our own torch implementation in the standard GPTQ layout.

    q = llmtune.get_quantizer("gptq", bits=4, group_size=128, damp_percent=0.01, act_order=False)
    qmodel = q.quantize(model, calibration=batches)   # batches: iterable of LongTensor [batch, seq]
    q.save(qmodel, "out/")                             # model.safetensors + config.json + quantize_config.json

What is written (``qweight``, ``qzeros``, ``scales``, ``g_idx``; ``checkpoint_format`` "gptq" = v1 by default)
is what transformers (through GPTQModel) and GPTQModel read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.interfaces import Quantizer
from llmtune.core.manifest import verify_manifest, write_manifest
from llmtune.core.options import check_choice, check_type

__all__ = ["CalibrationError", "GPTQQuantizer", "RTNQuantizer", "load_quantized", "save_quantized"]

_FORMATS = ("gptq", "gptq_v2")


class CalibrationError(ConfigError):
    """Calibration data that GPTQ cannot use (empty, wrong type or shape)."""


def _check_common(opts: Any) -> None:
    check_type("bits", opts.bits, int)
    check_choice("bits", opts.bits, (2, 3, 4, 8))
    check_type("group_size", opts.group_size, int)
    if opts.group_size != -1 and opts.group_size <= 0:
        raise InvalidOptionError(f"option group_size={opts.group_size} must be positive, or -1 (one group per row)")
    check_type("sym", opts.sym, bool)
    if opts.checkpoint_format is None:
        # v1 ("gptq") is what readers assume by default, but GPTQModel refuses asymmetric v1 checkpoints not
        # written by itself (AutoGPTQ's old asymmetric v1 was lossy): asymmetric grids go out as "gptq_v2".
        object.__setattr__(opts, "checkpoint_format", "gptq" if opts.sym else "gptq_v2")
    check_choice("checkpoint_format", opts.checkpoint_format, _FORMATS)
    if isinstance(opts.skip_modules, str) or not all(isinstance(s, str) for s in opts.skip_modules):
        raise InvalidOptionError(f"option skip_modules={opts.skip_modules!r} must be a list of module names")
    object.__setattr__(opts, "skip_modules", tuple(opts.skip_modules))
    check_type("quiet", opts.quiet, bool)


@dataclasses.dataclass(frozen=True)
class RTNOptions:
    """Round-to-nearest: the grid of GPTQ without the error feedback."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    skip_modules: tuple[str, ...] = ("lm_head",)
    checkpoint_format: str | None = None  # None: "gptq" (v1) when sym, else "gptq_v2"
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_common(self)


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings; defaults follow the paper (damp 0.01, lazy blocks of 128) with GPTQModel's sym/g128."""

    bits: int = 4
    group_size: int = 128
    damp_percent: float = 0.01
    act_order: bool = False
    desc_act: bool | None = None  # AutoGPTQ/transformers name for act_order; must agree with it when both given
    sym: bool = True
    true_sequential: bool = True
    static_groups: bool = False
    block_size: int = 128
    skip_modules: tuple[str, ...] = ("lm_head",)
    checkpoint_format: str | None = None  # None: "gptq" (v1) when sym, else "gptq_v2"
    quiet: bool = False

    def __post_init__(self) -> None:
        _check_common(self)
        check_type("damp_percent", self.damp_percent, (float, int))
        if not 0 < self.damp_percent < 1:
            raise InvalidOptionError(f"option damp_percent={self.damp_percent} must lie in (0, 1)")
        for field in ("act_order", "true_sequential", "static_groups"):
            check_type(field, getattr(self, field), bool)
        if self.desc_act is not None:
            check_type("desc_act", self.desc_act, bool)
            if self.act_order and not self.desc_act:
                raise InvalidOptionError("options act_order=True and desc_act=False contradict each other "
                                         "(desc_act is another name for act_order)")
            object.__setattr__(self, "act_order", self.desc_act)
        check_type("block_size", self.block_size, int)
        if self.block_size <= 0:
            raise InvalidOptionError(f"option block_size={self.block_size} must be positive")


class _PackedQuantizer(Quantizer):
    """Shared quantize/save/load of the two backends writing the GPTQ layout."""

    backend: ClassVar[str] = "llmtune"
    method: ClassVar[str] = ""

    def _spec(self) -> Any:
        from llmtune.quantizers.gptq.model import QuantSpec

        o = self.options
        return QuantSpec(
            bits=o.bits, group_size=o.group_size, sym=o.sym, checkpoint_format=o.checkpoint_format,
            act_order=getattr(o, "act_order", False), static_groups=getattr(o, "static_groups", False),
            damp_percent=getattr(o, "damp_percent", 0.01), block_size=getattr(o, "block_size", 128),
            true_sequential=getattr(o, "true_sequential", False),
        )

    def quantize(self, model: Any, calibration: Iterable[Any] | None = None) -> Any:
        """Quantize ``model``'s decoder-block linears in place; returns ``model``."""
        from llmtune.quantizers.gptq.model import find_blocks, quantize_model

        _, blocks = find_blocks(model)
        with _progress(f"{self.name} {self.options.bits}-bit", len(blocks), quiet=self.options.quiet) as advance:
            summary = quantize_model(model, self._spec(), method=self.method, calibration=calibration,
                                     skip_modules=self.options.skip_modules, progress=advance)
        prefix, _ = find_blocks(model)
        model.config.quantization_config = quantization_config_dict(
            self.options, method=self.method, block_prefix=prefix, modules=summary["modules"], model=model)
        model._llmtune_quant_summary = summary
        return model

    def save(self, model: Any, path: str | Path) -> Path:
        """Write safetensors + ``config.json`` (with ``quantization_config``) + ``quantize_config.json``."""
        return save_quantized(model, path)

    def load(self, path: str | Path, **kwargs: Any) -> Any:
        """Rebuild the model from ``config.json`` and swap in `QuantLinear` wherever ``qweight`` is stored."""
        return load_quantized(path, **kwargs)

    def hf_quantization_config(self) -> Any:
        """transformers' ``GPTQConfig`` describing what `save` writes (every field explicit)."""
        from transformers import GPTQConfig

        o = self.options
        return GPTQConfig(
            bits=o.bits, group_size=o.group_size, damp_percent=float(getattr(o, "damp_percent", 0.01)),
            desc_act=bool(getattr(o, "act_order", False)), act_group_aware=False, sym=o.sym,
            true_sequential=bool(getattr(o, "true_sequential", True)), format=o.checkpoint_format,
        )


class GPTQQuantizer(_PackedQuantizer):
    """GPTQ (Frantar et al. 2022) in torch, block by block, with a packed CPU/CUDA `QuantLinear`."""

    name: ClassVar[str] = "gptq"
    method: ClassVar[str] = "gptq"
    Options: ClassVar[type] = GPTQOptions


class RTNQuantizer(_PackedQuantizer):
    """Round-to-nearest with GPTQ's grouping and layout: the baseline GPTQ is measured against."""

    name: ClassVar[str] = "rtn"
    method: ClassVar[str] = "rtn"
    Options: ClassVar[type] = RTNOptions

    def hf_quantization_config(self) -> Any:
        """The ``GPTQConfig`` that loads what `save` writes (transformers itself cannot quantize by RTN)."""
        return super().hf_quantization_config()


def quantization_config_dict(options: Any, *, method: str, block_prefix: str, modules: list[str],
                             model: Any) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: transformers' GPTQConfig fields plus GPTQModel's meta."""
    from llmtune._version import __version__

    act_order = bool(getattr(options, "act_order", False))
    # Only list modules-in-block when some linear in the blocks was skipped.
    block_linears = _all_block_linears(model, block_prefix)
    in_block = sorted({m.split(".", len(block_prefix.split(".")) + 1)[-1] for m in modules})
    modules_in_block = None if len(modules) == len(block_linears) else [in_block]
    return {
        "quant_method": "gptq",
        "bits": options.bits,
        "group_size": options.group_size,
        "desc_act": act_order,
        "sym": options.sym,
        "damp_percent": float(getattr(options, "damp_percent", 0.01)),
        "true_sequential": bool(getattr(options, "true_sequential", False)),
        "static_groups": bool(getattr(options, "static_groups", False)),
        "act_group_aware": False,
        "lm_head": False,
        "format": options.checkpoint_format,
        "checkpoint_format": options.checkpoint_format,
        "pack_dtype": "int32",
        "block_name_to_quantize": block_prefix,
        "modules_in_block_to_quantize": modules_in_block,
        "meta": {
            "quantizer": [f"llmtune:{__version__}"],
            "method": method,
            "damp_percent": float(getattr(options, "damp_percent", 0.01)),
            "static_groups": bool(getattr(options, "static_groups", False)),
            "true_sequential": bool(getattr(options, "true_sequential", False)),
            "block_size": int(getattr(options, "block_size", 128)),
        },
    }


def _all_block_linears(model: Any, block_prefix: str) -> list[str]:
    from torch import nn

    from llmtune.quantizers.gptq.quant_linear import QuantLinear

    return [n for n, m in model.named_modules()
            if n.startswith(block_prefix + ".") and isinstance(m, (nn.Linear, QuantLinear))]


def save_quantized(model: Any, path: str | Path) -> Path:
    """Save a model quantized by `GPTQQuantizer`/`RTNQuantizer` in the standard GPTQ checkpoint layout."""
    from llmtune.quantizers.gptq.quant_linear import QuantLinear

    qcfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "gptq" or not any(
            isinstance(m, QuantLinear) for m in model.modules()):
        raise InvalidOptionError("save: the model holds no llmtune GPTQ/RTN layers; quantize it with "
                                 "llmtune.get_quantizer('gptq' or 'rtn').quantize(model, ...) first")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    quantize_config = {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "lm_head", "quant_method",
                                            "checkpoint_format", "pack_dtype", "meta")}
    quantize_config["damp_percent"] = qcfg["damp_percent"]
    quantize_config["static_groups"] = qcfg["static_groups"]
    quantize_config["true_sequential"] = qcfg["true_sequential"]
    (out / "quantize_config.json").write_text(json.dumps(quantize_config, indent=2) + "\n")
    write_manifest(out)  # checksums of every file, verified by load_quantized()
    return out


def _read_state_dict(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(path / f)))
        return state
    raise ConfigError(f"{path}: no model.safetensors (or model.safetensors.index.json) to load")


def load_quantized(path: str | Path, *, device: str | None = None, dtype: Any = None) -> Any:
    """Load a GPTQ-layout checkpoint (ours, or another tool's) into a transformers model with `QuantLinear`s."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.quantizers.gptq.model import _set_module
    from llmtune.quantizers.gptq.quant_linear import QuantLinear

    root = Path(path)
    verify_manifest(root, required=False)  # a damaged file is named (no manifest: another tool's checkpoint)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root}: no config.json; is this a directory written by Quantizer.save?")
    qcfg_file = root / "quantize_config.json"
    config = AutoConfig.from_pretrained(str(root))
    qcfg = getattr(config, "quantization_config", None)
    if not isinstance(qcfg, dict):
        qcfg = json.loads(qcfg_file.read_text()) if qcfg_file.is_file() else None
    if not qcfg or qcfg.get("quant_method", "gptq") != "gptq":
        raise ConfigError(f"{root}: config.json has no GPTQ quantization_config and there is no quantize_config.json")
    bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain model; we swap the layers ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype is not None else \
        AutoModelForCausalLM.from_config(config)
    state = _read_state_dict(root)
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        lin = model.get_submodule(name)
        layer = QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size,
                            bias=f"{name}.bias" in state, checkpoint_format=fmt,
                            dtype=state[f"{name}.bias"].dtype if f"{name}.bias" in state else torch.float16)
        _set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(f"{root}: checkpoint does not match the model built from config.json; "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    config.quantization_config = qcfg
    model.config.quantization_config = qcfg
    model.eval()
    if device is not None:
        model.to(device)
    return model


class _progress:
    """A rich progress bar with one step per decoder block (nothing when ``quiet``)."""

    def __init__(self, label: str, total: int, *, quiet: bool) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self._bar: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                             TextColumn("{task.completed}/{task.total} blocks"), TextColumn("{task.fields[layer]}"),
                             TimeElapsedColumn(), transient=False)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total, layer="")

        def advance(layer: str, done: int, total: int) -> None:
            self._bar.update(task, completed=done, layer=layer)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
