"""Fold an adapter into its base: LoRA ``W + (alpha/r) B A``; for QLoRA into the *dequantized* base.

A QLoRA adapter was trained against ``deq(q(W))``, not ``W``: merging it into the original full-precision
weights gives a model that was never trained (PEFT's and transformers' known caveat), and merging into the 4-bit
weights rounds the update away. So for a run with a quantizer the base is quantized exactly as in training,
every quantized layer is replaced by a plain ``nn.Linear`` holding ``deq(q(W))``, and the adapter is merged into
that: the merged model computes what the adapter-on-4-bit-base model computes (up to float rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from llmtune.core.errors import ConfigError
from llmtune.export.source import ExportError, Source

Progress = Callable[[str, int, int], None]


@dataclasses.dataclass
class Merged:
    """A merged model ready to write, and what its weights are."""

    model: Any
    tokenizer: Any
    merged_into: str        #: "full-precision base", "dequantized nf4 base (W = deq(q(W)) + BA)" or "no adapter"


def _quantizer(spec: dict[str, Any]) -> Any:
    """The run's quantizer, rebuilt from what the run recorded ({"name", "backend", **options})."""
    from llmtune.core.registry import get_quantizer

    options = {k: v for k, v in spec.items() if k not in ("name", "backend")}
    if isinstance(options.get("skip_modules"), list):
        options["skip_modules"] = tuple(options["skip_modules"])
    return get_quantizer(str(spec["name"]), backend=spec.get("backend"), **options)


def _dense_4bit(module: Any) -> Any:
    """The float weight of a bitsandbytes 4-bit layer, the way llmtune's guarded forward computes it.

    bitsandbytes' own ``dequantize_4bit`` is wrong on some CPU kernels (`llmtune.quantizers.bnb_guard`): a layer
    the guard moved to its fallback class dequantizes itself; any other through the reference written from the
    storage format (which a checked bitsandbytes kernel agrees with).
    """
    from llmtune.quantizers.bnb_guard import reference_dequantize_4bit

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):  # repacked by an eval forward on CPU
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    if type(module).__name__ == "ReferenceLinear4bit":
        return module.dequantize()
    return reference_dequantize_4bit(weight.data, weight.quant_state)


def _dequantized_linear(module: Any, name: str) -> Any:
    """A plain ``nn.Linear`` holding the weights a bitsandbytes layer computes with (float32)."""
    import bitsandbytes as bnb
    import torch

    if isinstance(module, bnb.nn.Linear4bit):
        dense = _dense_4bit(module).float()
    elif isinstance(module, bnb.nn.Linear8bitLt):
        weight = module.weight
        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = getattr(module.state, "SCB", None)
        if scb is None:
            raise ExportError(f"layer {name}: an 8-bit layer without row scales (SCB); was it quantized?")
        dense = weight.data.float() * (scb.float()[:, None] / 127.0)
    else:
        raise ExportError(f"layer {name} is a {type(module).__name__}; export can dequantize bitsandbytes 4-bit and "
                          "8-bit layers only")
    linear = torch.nn.Linear(dense.shape[1], dense.shape[0], bias=module.bias is not None, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.copy_(dense)
        if module.bias is not None:
            linear.bias.copy_(module.bias.float())
    return linear


def _is_bnb_layer(module: Any) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def dequantize_model(model: Any) -> int:
    """Replace every bitsandbytes linear layer of ``model`` by its dequantized ``nn.Linear``; returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if _is_bnb_layer(m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _dequantized_linear(module, name))
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, attr, False):
            setattr(model, attr, False)
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    return len(targets)


def model_head(source: Source) -> str:
    """``"score"`` for a reward model (a SEQ_CLS adapter: PEFT's sequence-classification task, or a model saved as
    ``XForSequenceClassification``), else ``"lm"``."""
    import json
    from pathlib import Path

    if source.adapter_dir is not None:
        return "score" if source.adapter_config.get("task_type") == "SEQ_CLS" else "lm"
    config = Path(source.base).expanduser() / "config.json"
    try:
        archs = json.loads(config.read_text()).get("architectures") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        archs = None  # the loader names what is wrong with it
    return "score" if any(str(a).endswith("ForSequenceClassification") for a in archs or []) else "lm"


def _adapter_has_head(source: Source) -> bool:
    """Whether the adapter saved the trained score head beside its weights (``modules_to_save``)."""
    from llmtune.models.loading import safetensors_names

    saved = set(source.adapter_config.get("modules_to_save") or ())
    path = source.adapter_dir / "adapter_model.safetensors" if source.adapter_dir is not None else None
    names = safetensors_names(path) if path is not None and path.is_file() else []
    return any(saved & set(name.split(".")) for name in names if "lora_" not in name)


def load_tokenizer(source: Source, trust_remote_code: bool = False) -> Any:
    """The tokenizer the run saved with its adapter, else the base model's."""
    from transformers import AutoTokenizer

    if source.adapter_dir is not None and (source.adapter_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(source.adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(source.base, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # as load_model_and_tokenizer does
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(source: Source, *, quantized: bool = False, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(base model in float32, tokenizer); ``quantized``: quantized as the run's quantizer did in training.

    A reward model's base loads as a 1-label ``XForSequenceClassification``; its score head comes from the base
    or from the adapter (``modules_to_save``), and is refused when neither has trained weights for it."""
    import torch

    from llmtune.models.loading import load_model_and_tokenizer

    head = model_head(source)
    model, tokenizer = load_model_and_tokenizer(
        source.base, dtype=torch.float32, trust_remote_code=trust_remote_code, head=head,
        fresh_head=head == "score" and _adapter_has_head(source),
        head_hint="neither the base nor the adapter holds a trained score head: export the run that trained it")
    if source.adapter_dir is not None and (source.adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(source)
    if quantized:
        if source.quantizer is None:
            raise ConfigError(f"{source.path}: the run recorded no quantizer, so there is no quantized base")
        # quantized as in training: from the precision the run trained in (bf16 weights quantize differently)
        cast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(source.precision or "")
        model = _quantizer(source.quantizer).quantize(model.to(cast) if cast is not None else model)
    return model, tokenizer


def check_mergeable(source: Source) -> None:
    cfg = source.adapter_config
    kind = cfg.get("peft_type")
    if kind not in (None, "LORA"):
        raise ExportError(f"{source.adapter_dir}: a {kind} adapter has no weights to merge (only LoRA/DoRA do); "
                          "serve it with PEFT, or retrain with LoRA to export a standalone model")


def merge(source: Source, *, trust_remote_code: bool = False, progress: Progress | None = None) -> Merged:
    """The base with the adapter folded in (float32); QLoRA: into the dequantized base."""
    if source.adapter_dir is not None:
        check_mergeable(source)
    if progress:
        progress("load base", 0, 1)
    quantized = source.adapter_dir is not None and source.quantizer is not None
    model, tokenizer = load_base(source, quantized=quantized, trust_remote_code=trust_remote_code)
    if progress:
        progress("load base", 1, 1)
    if source.adapter_dir is None:
        return Merged(model, tokenizer, "no adapter (the model as given)")
    what = "full-precision base (W + BA)"
    if quantized:
        assert source.quantizer is not None
        n = dequantize_model(model)
        what = f"dequantized {source.quantizer['name']} base (W = deq(q(W)) + BA; {n} layers dequantized)"
    from peft import PeftModel

    from llmtune.core.manifest import verify_manifest

    verify_manifest(source.adapter_dir, required=False)  # an adapter llmtune saved carries checksums
    if progress:
        progress("merge adapter", 0, 1)
    peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    merged = peft_model.merge_and_unload()
    merged.eval()
    if progress:
        progress("merge adapter", 1, 1)
    return Merged(merged, tokenizer, what)
