"""bitsandbytes quantizers: NF4 and FP4 (QLoRA's 4-bit blocks) and LLM.int8, in place, on CPU or CUDA.

``quantize`` swaps every ``nn.Linear`` (except the skip list, ``lm_head`` by default) for a
``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` on the device the layer already lives on; the
weights are quantized there (bitsandbytes >= 0.47 runs all of this on CPU). Every setting is explicit,
because bitsandbytes' layers and transformers' ``BitsAndBytesConfig`` disagree on the defaults.

A quantized transformers model is marked exactly like one that ``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))`` returns, so ``save_pretrained``, ``dequantize()``,
PEFT's ``prepare_model_for_kbit_training`` and the HF ``Trainer`` treat both the same way; ``save`` and
``load`` use transformers' own bitsandbytes serialisation (safetensors: packed weight, ``absmax``,
``quant_map``, nested statistics, ``SCB``), which round-trips bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from llmtune.core.errors import (
    ArgumentTypeError,
    ConfigError,
    GPURequiredError,
    InvalidOptionError,
    LlmtuneError,
    UnknownOptionError,
)
from llmtune.core.interfaces import ProgressFn, Quantizer
from llmtune.core.manifest import verify_manifest, write_manifest
from llmtune.core.options import check_choice, check_positive, check_type
from llmtune.quantizers.skip import check_skip_modules, hf_skip_regex, is_skipped, skip_matches

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig

__all__ = [
    "BLOCKSIZES", "COMPUTE_DTYPES", "QUANT_STORAGES", "RECORD_FILE", "FP4Quantizer", "FourBitOptions",
    "INT8Quantizer", "Int8Options", "NF4Quantizer", "hf_skip_regex", "resolve_compute_dtype", "skip_matches",
]

#: Compute dtypes a 4-bit layer can dequantize to before its matmul ("auto": see `resolve_compute_dtype`).
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
#: 4-bit block sizes bitsandbytes accepts (its ``quantize_4bit`` op, CPU and CUDA alike).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Storage dtypes of the packed 4-bit bytes (a reinterpretation of the same bytes, for FSDP).
QUANT_STORAGES = ("uint8", "int8", "bfloat16", "float16", "float32")
#: The file ``save`` writes next to ``config.json`` with the llmtune settings.
RECORD_FILE = "llmtune_quantization.json"


class _OnceFilter(logging.Filter):
    """Let a log message that starts with ``prefix`` through once; bnb repeats it on every int8 matmul."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


class _DropFilter(logging.Filter):
    """Drop log messages that start with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_INT8_CAST_LOG = logging.getLogger("bitsandbytes.autograd._functions")
if not any(isinstance(f, _OnceFilter) for f in _INT8_CAST_LOG.filters):
    _INT8_CAST_LOG.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


def quiet_bnb_import() -> None:
    """Drop the warning bitsandbytes logs on import on AVX512-BF16 CPUs when the optional ``kernels`` package
    (a faster fused CPU kernel from the hub) is absent: bitsandbytes then uses its built-in kernel, which
    llmtune checks (`llmtune.quantizers.bnb_guard`). Cheap; imports nothing."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropFilter) for f in log.filters):
        log.addFilter(_DropFilter("Failed to load CPU gemm_4bit_forward from kernels-community"))


quiet_bnb_import()


@dataclasses.dataclass(frozen=True)
class FourBitOptions:
    """Settings of the 4-bit quantizers (``nf4``, ``fp4``); every default is chosen here, not inherited."""

    #: dtype the weights are dequantized to for the matmul. "auto": bfloat16 on a CUDA GPU that has it (QLoRA's
    #: choice), float16 on older GPUs, float32 on CPU (bf16 matmul is ~5x slower than fp32 on CPUs without
    #: AVX512-BF16); decided by the device the model is on when quantized, and recorded.
    compute_dtype: str = "auto"
    #: Quantize the per-block absmax too (8-bit, blocks of 256): ~0.37 bit/parameter saved, as in QLoRA.
    double_quant: bool = True
    #: Weights per absmax block. transformers' load-time path always uses 64.
    blocksize: int = 64
    #: dtype the packed bytes are stored as (uint8, or a float type for FSDP sharding).
    quant_storage: str = "uint8"
    #: Modules left in full precision: names, dotted suffixes ("mlp.down_proj") or globs ("*.0.*"); a parent
    #: skips its children (`llmtune.quantizers.skip`: the same meaning for every quantizer).
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_type("double_quant", self.double_quant, bool)
        check_type("blocksize", self.blocksize, int)
        check_choice("blocksize", self.blocksize, BLOCKSIZES)
        check_choice("quant_storage", self.quant_storage, QUANT_STORAGES)
        object.__setattr__(self, "skip_modules", check_skip_modules(self.skip_modules))


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """Settings of the ``int8`` quantizer (LLM.int8: row-wise absmax int8 weights + fp16 outlier columns)."""

    #: Activation magnitude above which a feature column is computed in 16-bit (the paper's 6.0); 0 disables.
    threshold: float = 6.0
    #: Keep 16-bit weights and re-quantize each forward (8-bit training); False stores int8 weights.
    has_fp16_weights: bool = False
    #: Modules left in full precision (same patterns as for 4-bit).
    skip_modules: tuple[str, ...] = ("lm_head",)

    def __post_init__(self) -> None:
        check_positive("threshold", self.threshold, (int, float), zero_ok=True)
        object.__setattr__(self, "threshold", float(self.threshold))
        check_type("has_fp16_weights", self.has_fp16_weights, bool)
        object.__setattr__(self, "skip_modules", check_skip_modules(self.skip_modules))


def resolve_compute_dtype(requested: str, device_type: str) -> str:
    """The compute dtype "auto" stands for on ``device_type`` ("cuda", "cpu", ...); other values unchanged."""
    if requested != "auto":
        return requested
    if device_type == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _default_device_type() -> str:
    """Where transformers' ``from_pretrained`` puts a bitsandbytes model by default: CUDA when present."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _fill(layer: torch.nn.Module, weight: Any, linear: torch.nn.Linear) -> torch.nn.Module:
    """Give the bitsandbytes ``layer`` its (not yet quantized) ``weight``, quantized by the move to ``linear``'s
    device, and ``linear``'s bias, frozen."""
    import torch

    layer.weight = weight.to(linear.weight.device)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


class _BnbQuantizer(Quantizer):
    """What the three bitsandbytes quantizers share: layer swapping, bookkeeping, save and load."""

    backend: ClassVar[str] = "bnb"
    trainable: ClassVar[bool] = True

    # -- per-method hooks --------------------------------------------------------------------------
    def _make_layer(self, linear: torch.nn.Linear, device_type: str) -> torch.nn.Module:
        """A bitsandbytes layer holding ``linear``'s quantized weight, on ``linear``'s device."""
        raise NotImplementedError

    def _bnb_config(self, skip: list[str], device_type: str) -> BitsAndBytesConfig:
        """The full ``BitsAndBytesConfig`` (every field set) with ``skip`` as its skip list."""
        raise NotImplementedError

    def _resolved(self, device_type: str) -> dict[str, Any]:
        """Settings that depend on the device (recorded next to the options)."""
        return {}

    # -- public API --------------------------------------------------------------------------------
    def hf_quantization_config(self) -> BitsAndBytesConfig:
        """``transformers.BitsAndBytesConfig`` with these settings, for load-time quantization.

        ``compute_dtype="auto"`` resolves for the device ``from_pretrained`` uses by default (CUDA if present).
        """
        return self._bnb_config([hf_skip_regex(p) for p in self.options.skip_modules], _default_device_type())

    def quantize(self, model: Any, calibration: Iterable[Any] | None = None, *,
                 progress: ProgressFn | None = None) -> Any:
        """Replace ``model``'s ``nn.Linear`` layers in place (skip list aside) and return ``model``.

        bitsandbytes needs no data: ``calibration`` is accepted for a uniform quantizer API and unused.
        Each layer is quantized on the device its weight is on (CPU or CUDA); ``progress(name, done, total)``
        is called after each layer.
        """
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ArgumentTypeError(f"{self.describe()}: quantize() needs a torch.nn.Module, got {type(model).__name__}")
        if getattr(model, "llmtune_quantization", None) is not None or getattr(model, "is_quantized", False):
            raise LlmtuneError(f"{self.describe()}: the model is already quantized; quantize the original model")
        skip = list(self.options.skip_modules)
        skip += [p for p in (getattr(model, "_keep_in_fp32_modules", None) or []) if p not in skip]
        targets: list[tuple[str, torch.nn.Linear]] = []
        kept: list[str] = []
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear:
                if is_skipped(name, skip):
                    kept.append(name)
                else:
                    targets.append((name, module))
        if not targets:
            raise LlmtuneError(
                f"{self.describe()}: no torch.nn.Linear layer left to quantize "
                f"(linear layers: {kept or 'none'}; skip_modules={list(self.options.skip_modules)})"
            )
        device_types = {linear.weight.device.type for _, linear in targets}
        if "meta" in device_types:
            raise LlmtuneError(f"{self.describe()}: the model has layers on the meta device; load its weights first")
        device_type = "cuda" if "cuda" in device_types else targets[0][1].weight.device.type
        for done, (name, linear) in enumerate(targets, 1):
            layer = self._make_layer(linear, device_type)
            layer.train(linear.training)
            model.set_submodule(name, layer)
            if progress:
                progress(name, done, len(targets))
        record = self._record([n for n, _ in targets], kept, device_type)
        setattr(model, "llmtune_quantization", record)  # noqa: B010 (a torch Module attribute, not a tensor)
        self._mark_transformers_model(model, skip, device_type)
        self._guard(model)
        return model

    def save(self, model: Any, path: str | Path) -> Path:
        """Write ``model`` (quantized by this quantizer) to directory ``path`` as safetensors + config.json."""
        record = self._check_record(getattr(model, "llmtune_quantization", None), where="save()")
        if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
            raise LlmtuneError(
                f"{self.describe()}: save() needs a transformers PreTrainedModel (config.json is what lets load() "
                f"rebuild the architecture); got {type(model).__name__}"
            )
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise LlmtuneError(f"{self.describe()}: save path {out} exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        (out / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_manifest(out)  # checksums of every file, verified by load()
        return out

    def load(self, path: str | Path, **kwargs: Any) -> Any:
        """Read a directory written by `save`; the model has the saved settings and identical outputs.

        Keyword ``device_map`` (default ``"cpu"``) places the model, as in ``from_pretrained``.
        """
        import transformers

        directory = Path(path)
        verify_manifest(directory, required=False)  # a damaged file is named (no manifest: another tool's files)
        record_path = directory / RECORD_FILE
        if not record_path.is_file():
            raise ConfigError(
                f"{self.describe()}: {record_path} not found; {directory} was not written by llmtune's bnb save()"
            )
        try:
            record = json.loads(record_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{record_path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
        record = self._check_record(record, where=f"load() of {directory}")
        unknown = set(kwargs) - {"device_map"}
        if unknown:
            raise UnknownOptionError(f"{self.describe()}: load() takes device_map only, got {sorted(unknown)}")
        config = transformers.AutoConfig.from_pretrained(directory)
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            raise ConfigError(
                f"{directory / 'config.json'}: field 'architectures' ({architectures}) names no transformers class"
            )
        model = cls.from_pretrained(directory, device_map=kwargs.get("device_map", "cpu"))
        model.llmtune_quantization = record
        self._guard(model)
        return model

    # -- helpers -----------------------------------------------------------------------------------
    def _guard(self, model: Any) -> None:
        """4-bit layers whose bitsandbytes kernel fails the self-check compute on the reference path."""

    def _record(self, quantized: list[str], kept: list[str], device_type: str) -> dict[str, Any]:
        """The settings stored on the model (``model.llmtune_quantization``) and saved next to it."""
        import bitsandbytes

        options = dataclasses.asdict(self.options)
        options["skip_modules"] = list(options["skip_modules"])
        return {
            "name": self.name,
            "backend": self.backend,
            "options": options,
            "resolved": self._resolved(device_type),
            "quantized_on": device_type,
            "bitsandbytes_version": bitsandbytes.__version__,
            "quantized_modules": quantized,
            "skipped_modules": kept,
        }

    def _check_record(self, record: object, where: str) -> dict[str, Any]:
        """``record`` if it describes a model quantized by this quantizer, else a clear error."""
        if not isinstance(record, dict):
            raise LlmtuneError(
                f"{self.describe()}: {where} needs a model quantized by llmtune (call quantize() first)"
            )
        if record.get("backend") != self.backend or record.get("name") != self.name:
            raise LlmtuneError(
                f"{self.describe()}: {where}: the model was quantized with {record.get('name')!r} "
                f"(backend {record.get('backend')!r}); use llmtune.get_quantizer({record.get('name')!r}) instead"
            )
        return record

    def _mark_transformers_model(self, model: Any, skip: list[str], device_type: str) -> None:
        """Mark a transformers model the way ``from_pretrained(quantization_config=...)`` does."""
        from transformers import PreTrainedModel
        from transformers.quantizers.auto import AutoHfQuantizer

        if not isinstance(model, PreTrainedModel):
            return
        config = self._bnb_config([hf_skip_regex(p) for p in skip], device_type)
        hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)
        hf_quantizer.modules_to_not_convert = list(config.llm_int8_skip_modules)
        for attr, value in (("is_quantized", True), ("quantization_method", config.quant_method),
                            ("hf_quantizer", hf_quantizer)):
            setattr(model, attr, value)
        hf_quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_{4,8}bit


class _FourBitQuantizer(_BnbQuantizer):
    """NF4/FP4 weights in blocks with an absmax each (optionally double-quantized): ``bnb.nn.Linear4bit``."""

    Options: ClassVar[type] = FourBitOptions
    quant_type: ClassVar[str] = ""

    def _resolved(self, device_type: str) -> dict[str, Any]:
        return {"compute_dtype": resolve_compute_dtype(self.options.compute_dtype, device_type)}

    def _guard(self, model: Any) -> None:
        from llmtune.quantizers.bnb_guard import guard_4bit_model

        guard_4bit_model(model)

    def _make_layer(self, linear: torch.nn.Linear, device_type: str) -> torch.nn.Module:
        import bitsandbytes as bnb

        opts: FourBitOptions = self.options
        compute_dtype = _torch_dtype(resolve_compute_dtype(opts.compute_dtype, device_type))
        storage = _torch_dtype(opts.quant_storage)
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=compute_dtype, compress_statistics=opts.double_quant,
            quant_type=self.quant_type, quant_storage=storage, device="meta",
        )
        # Params4bit quantizes when moved to a (non-meta) device: here, the device the weight is on.
        weight: Any = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, blocksize=opts.blocksize,
            compress_statistics=opts.double_quant, quant_type=self.quant_type, quant_storage=storage, module=layer,
        )
        return _fill(layer, weight, linear)

    def _bnb_config(self, skip: list[str], device_type: str) -> BitsAndBytesConfig:
        from transformers import BitsAndBytesConfig

        opts: FourBitOptions = self.options
        compute_dtype = _torch_dtype(resolve_compute_dtype(opts.compute_dtype, device_type))
        return BitsAndBytesConfig(
            load_in_4bit=True, load_in_8bit=False,
            bnb_4bit_quant_type=self.quant_type, bnb_4bit_use_double_quant=opts.double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=opts.quant_storage,
            llm_int8_skip_modules=skip, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
            llm_int8_enable_fp32_cpu_offload=False,
        )

    def hf_quantization_config(self) -> BitsAndBytesConfig:
        """``transformers.BitsAndBytesConfig`` with these settings (needs ``blocksize=64``, transformers' only one)."""
        if self.options.blocksize != 64:
            raise InvalidOptionError(
                f"{self.describe()}: option blocksize={self.options.blocksize} cannot be expressed in "
                "transformers' BitsAndBytesConfig, whose load-time quantization always uses blocks of 64; "
                "use blocksize=64, or quantize() the loaded model (save()/load() keep any blocksize)",
                field="blocksize",
            )
        return super().hf_quantization_config()


class NF4Quantizer(_FourBitQuantizer):
    """4-bit NormalFloat (QLoRA): 16 levels at normal quantiles, scaled by each block's absmax."""

    name: ClassVar[str] = "nf4"
    quant_type: ClassVar[str] = "nf4"


class FP4Quantizer(_FourBitQuantizer):
    """4-bit float (E2M1): 16 levels of a tiny float format, scaled by each block's absmax."""

    name: ClassVar[str] = "fp4"
    quant_type: ClassVar[str] = "fp4"


class INT8Quantizer(_BnbQuantizer):
    """LLM.int8: row-wise absmax int8 weights; outlier activation columns computed in 16-bit."""

    name: ClassVar[str] = "int8"
    Options: ClassVar[type] = Int8Options

    def _make_layer(self, linear: torch.nn.Linear, device_type: str) -> torch.nn.Module:
        import bitsandbytes as bnb

        opts: Int8Options = self.options
        if opts.has_fp16_weights and linear.weight.device.type != "cuda":
            raise GPURequiredError(
                f"{self.describe()}: option has_fp16_weights=True needs the model on a CUDA GPU (bitsandbytes has "
                f"no {linear.weight.device.type} kernel for its int8_double_quant); use has_fp16_weights=False"
            )
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            has_fp16_weights=opts.has_fp16_weights, threshold=opts.threshold, device="meta",
        )
        # Int8Params quantizes only when moved from CPU to a device, exactly as transformers loads it.
        weight: Any = bnb.nn.Int8Params(
            linear.weight.data.to("cpu"), requires_grad=opts.has_fp16_weights, has_fp16_weights=opts.has_fp16_weights,
        )
        return _fill(layer, weight, linear)

    def _bnb_config(self, skip: list[str], device_type: str) -> BitsAndBytesConfig:
        from transformers import BitsAndBytesConfig

        opts: Int8Options = self.options
        return BitsAndBytesConfig(
            load_in_8bit=True, load_in_4bit=False,
            llm_int8_threshold=opts.threshold, llm_int8_has_fp16_weight=opts.has_fp16_weights,
            llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=False,
        )
