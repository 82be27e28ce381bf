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

from llmtune.core.errors import ConfigError, DamagedFileError, InvalidOptionError
from llmtune.core.interfaces import ProgressFn, Quantizer
from llmtune.core.manifest import verify_manifest, write_manifest
from llmtune.core.options import check_choice, check_positive, check_type
from llmtune.quantizers.skip import check_skip_modules

__all__ = ["CalibrationError", "GPTQOptions", "GPTQQuantizer", "GridOptions", "RTNOptions", "RTNQuantizer",
           "gptq_config", "load_quantized", "save_quantized"]

#: Bits per weight the GPTQ int32 layout packs.
SUPPORTED_BITS = (2, 3, 4, 8)
#: Zero-point conventions: "gptq" (v1, zero - 1 stored) and "gptq_v2" (the zero itself).
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class CalibrationError(ConfigError):
    """Calibration data that GPTQ cannot use (empty, wrong type or shape)."""


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """What RTN and GPTQ share: the quantization grid, what is skipped, and the checkpoint layout.

    The GPTQ solver's knobs are fields here too, fixed (not options) for RTN, so that every value the
    checkpoint records (``config.json``, ``quantize_config.json``, `gptq_config`) is read from one place.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    #: Modules left in full precision: names, dotted suffixes or globs; a parent skips its children
    #: (`llmtune.quantizers.skip`, the same meaning as for bitsandbytes).
    skip_modules: tuple[str, ...] = ("lm_head",)
    checkpoint_format: str | None = None  # None: "gptq" (v1) when sym, else "gptq_v2"
    #: Accepted for compatibility and ignored: the library prints nothing; pass ``progress=`` to ``quantize``.
    quiet: bool = False
    act_order: bool = dataclasses.field(default=False, init=False)
    damp_percent: float = dataclasses.field(default=0.01, init=False)
    true_sequential: bool = dataclasses.field(default=False, init=False)
    static_groups: bool = dataclasses.field(default=False, init=False)
    block_size: int = dataclasses.field(default=128, init=False)

    def __post_init__(self) -> None:
        check_type("bits", self.bits, int)
        check_choice("bits", self.bits, SUPPORTED_BITS)
        check_type("group_size", self.group_size, int)
        if self.group_size != -1 and self.group_size <= 0:
            raise InvalidOptionError(f"option group_size={self.group_size} must be positive, or -1 (one group per row)",
                                     field="group_size")
        check_type("sym", self.sym, bool)
        if self.checkpoint_format is None:
            # v1 ("gptq") is what readers assume by default, but GPTQModel refuses asymmetric v1 checkpoints not
            # written by itself (AutoGPTQ's old asymmetric v1 was lossy): asymmetric grids go out as "gptq_v2".
            object.__setattr__(self, "checkpoint_format", self.layout)
        check_choice("checkpoint_format", self.checkpoint_format, CHECKPOINT_FORMATS)
        object.__setattr__(self, "skip_modules", check_skip_modules(self.skip_modules))
        check_type("quiet", self.quiet, bool)

    @property
    def layout(self) -> str:
        """The checkpoint format written: ``checkpoint_format`` as `__post_init__` resolved it (never None)."""
        return self.checkpoint_format or ("gptq" if self.sym else "gptq_v2")


@dataclasses.dataclass(frozen=True)
class RTNOptions(GridOptions):
    """Round-to-nearest: the grid of GPTQ without the error feedback (no solver knobs to set)."""


@dataclasses.dataclass(frozen=True)
class GPTQOptions(GridOptions):
    """GPTQ settings; defaults follow the paper (damp 0.01, lazy blocks of 128) with GPTQModel's sym/g128."""

    damp_percent: float = 0.01
    act_order: bool = False
    desc_act: bool | None = None  # AutoGPTQ/transformers name for act_order; must agree with it when both given
    true_sequential: bool = True
    static_groups: bool = False
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_type("damp_percent", self.damp_percent, (float, int))
        if not 0 < self.damp_percent < 1:
            raise InvalidOptionError(f"option damp_percent={self.damp_percent} must lie in (0, 1)", field="damp_percent")
        object.__setattr__(self, "damp_percent", float(self.damp_percent))
        for field in ("act_order", "true_sequential", "static_groups"):
            check_type(field, getattr(self, field), bool)
        if self.desc_act is not None:
            check_type("desc_act", self.desc_act, bool)
            if self.act_order and not self.desc_act:
                raise InvalidOptionError("options act_order=True and desc_act=False contradict each other "
                                         "(desc_act is another name for act_order)", field="desc_act")
            object.__setattr__(self, "act_order", self.desc_act)
        check_positive("block_size", self.block_size)


def gptq_config(options: GridOptions) -> Any:
    """transformers' ``GPTQConfig`` for ``options``, every field explicit (what `save` writes, for loading)."""
    from transformers import GPTQConfig

    o = options
    return GPTQConfig(bits=o.bits, group_size=o.group_size, damp_percent=o.damp_percent, desc_act=o.act_order,
                      act_group_aware=False, sym=o.sym, true_sequential=o.true_sequential,
                      format=o.layout)


class _PackedQuantizer(Quantizer):
    """Shared quantize/save/load of the two backends writing the GPTQ layout."""

    backend: ClassVar[str] = "llmtune"
    method: ClassVar[str] = ""

    def quantize(self, model: Any, calibration: Iterable[Any] | None = None, *,
                 progress: ProgressFn | None = None) -> Any:
        """Quantize ``model``'s decoder-block linears in place; returns ``model``.

        ``progress(block_name, done, total)`` is called after each decoder block.
        """
        from llmtune.quantizers.gptq.model import find_blocks, quantize_model

        summary = quantize_model(model, self.options, method=self.method, calibration=calibration,
                                 progress=progress)
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
        """transformers' ``GPTQConfig`` that loads what `save` writes (transformers itself cannot quantize by RTN)."""
        return gptq_config(self.options)


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


def quantization_config_dict(options: GridOptions, *, method: str, block_prefix: str, modules: list[str],
                             model: Any) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: transformers' GPTQConfig fields plus GPTQModel's meta."""
    from llmtune._version import __version__

    # Only list modules-in-block when some linear in the blocks was skipped.
    block_linears = _all_block_linears(model, block_prefix)
    in_block = sorted({m.split(".", len(block_prefix.split(".")) + 1)[-1] for m in modules})
    modules_in_block = None if len(modules) == len(block_linears) else [in_block]
    solver = {"damp_percent": options.damp_percent, "static_groups": options.static_groups,
              "true_sequential": options.true_sequential}
    # A partial last group: transformers (through GPTQModel) would pick the CPU ATen int4 kernel, which claims
    # to pad but whose torch op refuses K % group != 0; name GPTQModel's plain torch kernel, which reads it.
    kernel = {"backend": PARTIAL_GROUP_BACKEND} if _has_partial_group(model, modules, options.group_size) else {}
    return {
        "quant_method": "gptq",
        "bits": options.bits,
        "group_size": options.group_size,
        "desc_act": options.act_order,
        "sym": options.sym,
        **solver,
        "act_group_aware": False,
        "lm_head": False,
        "format": options.checkpoint_format,
        "checkpoint_format": options.checkpoint_format,
        "pack_dtype": "int32",
        "block_name_to_quantize": block_prefix,
        "modules_in_block_to_quantize": modules_in_block,
        "meta": {"quantizer": [f"llmtune:{__version__}"], "method": method, **solver,
                 "block_size": options.block_size},
        **kernel,
    }


#: The kernel transformers' GPTQ integration is told to use for checkpoints with a partial last group.
PARTIAL_GROUP_BACKEND = "gptq_torch"


def _has_partial_group(model: Any, modules: list[str], group_size: int) -> bool:
    """Whether ``group_size`` leaves a partial last group in any of the quantized ``modules``."""
    return group_size != -1 and any(model.get_submodule(m).in_features % group_size for m in modules)


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


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from None


def _read_state_dict(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        files = [single.name]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{index}: field 'weight_map' missing or not a mapping")
        files = sorted(set(weight_map.values()))
    else:
        raise ConfigError(f"{path}: no model.safetensors (or model.safetensors.index.json) to load")
    state: dict[str, Any] = {}
    for f in files:
        try:
            state.update(load_file(str(path / f)))
        except (SafetensorError, OSError) as exc:
            raise DamagedFileError(f"{path / f}: unreadable ({exc})") from None
    return state


def _grid_fields(qcfg: dict[str, Any], root: Path) -> tuple[int, int, str]:
    """``bits``, ``group_size`` and the checkpoint format a GPTQ ``quantization_config`` declares."""
    try:
        bits, group_size = int(qcfg["bits"]), int(qcfg["group_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{root}: the GPTQ quantization_config has no usable bits/group_size ({exc!r})") from None
    return bits, group_size, qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"


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
        qcfg = _read_json(qcfg_file) if qcfg_file.is_file() else None
    if not isinstance(qcfg, dict) or qcfg.get("quant_method", "gptq") != "gptq":
        raise ConfigError(f"{root}: config.json has no GPTQ quantization_config and there is no quantize_config.json")
    bits, group_size, fmt = _grid_fields(qcfg, root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build a plain model; we swap the layers ourselves
    model = AutoModelForCausalLM.from_config(config, dtype=dtype) if dtype is not None else \
        AutoModelForCausalLM.from_config(config)
    state = _read_state_dict(root)
    for key in [k for k in state if k.endswith(".qweight")]:
        name = key[: -len(".qweight")]
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{root}: the checkpoint holds {key}, but the model built from config.json has no "
                              f"module {name!r}") from None
        layer = QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size,
                            bias=f"{name}.bias" in state, checkpoint_format=fmt,
                            dtype=state[f"{name}.bias"].dtype if f"{name}.bias" in state else torch.float16)
        _set_module(model, name, layer)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that disagree with config.json
        text = " ".join(str(exc).split())
        raise ConfigError(f"{root}: checkpoint does not match the model built from config.json: {text[:300]}") from None
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
