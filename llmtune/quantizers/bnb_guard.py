"""A guard against wrong bitsandbytes 4-bit kernels: a cached self-check and a correct fallback path.

bitsandbytes 0.50.2's AVX-512 CPU kernel dequantizes NF4/FP4 weights wrongly when a row's length is not a
multiple of the blocksize (errors of one or two absmax units instead of < 0.2), and its AVX512-BF16 forward
crashes when the input width is not a multiple of the blocksize. Which kernel runs depends on the CPU (and
on the GPU, driver and bitsandbytes version elsewhere), so nothing about a machine is assumed here:

* `check_layer` compares what bitsandbytes computes for one ``Linear4bit`` (its ``dequantize_4bit`` and its
  forward, in inference and in training mode) with `reference_dequantize_4bit`, written from the storage
  format alone (code table, high-nibble-first packing, blockwise absmax, nested absmax). The verdict is
  cached per *kernel class*: (out_features, in_features, blocksize, quant_type, double quant, compute dtype,
  storage dtype, device type), so a model with 4 distinct layer shapes is checked 4 times, once per process.
* bitsandbytes' AVX512-BF16 inference path (it repacks the weight in place on the first eval forward and
  rounds absmax to bf16, so a later ``save`` writes other bits than were quantized) is switched off per layer.
* `guard_4bit_model` runs the check for every ``Linear4bit`` of a model and moves each layer whose class
  failed to `reference_linear4bit_class` (a ``Linear4bit`` subclass: same parameters, same state dict, same
  ``isinstance`` for PEFT and transformers) whose forward is ``F.linear(x, reference dequantization)``.
  The verdict is stored on the model as ``model.llmtune_kernel_check``.

The library prints nothing: the verdicts are returned, stored on the model and logged at INFO level on the
``llmtune.quantizers.bnb`` logger.
"""

from __future__ import annotations

import copy
import functools
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "FP4_CODE", "NF4_CODE", "KernelVerdict", "block_rows_dequantize", "check_dequantize", "check_layer", "clear_cache", "guard_4bit_model",
    "reference_absmax", "reference_dequantize_4bit", "reference_linear4bit_class", "working_blocksizes",
]

_LOG = logging.getLogger("llmtune.quantizers.bnb")

#: The NF4 code (QLoRA, appendix E): 16 normal quantiles normalised to [-1, 1], index = 4-bit value.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
#: FP4 (E2M1, bias 2) in bit-pattern order (bit 3 is the sign), normalised by its largest magnitude, 12.
FP4_CODE = tuple(v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3))
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
#: Largest |bnb dequantize - reference| accepted, in units of the layer's largest absmax (bit-exact in practice).
DEQUANT_TOL = 1e-5
#: Largest |bnb forward - reference forward| accepted, relative to max(|x| @ |W|^T) (bf16 kernels round inputs).
FORWARD_TOL = 2e-2


@dataclass(frozen=True)
class KernelVerdict:
    """The self-check's answer for one kernel class: ``ok``, or the cause of the failure."""

    key: tuple[Any, ...]
    ok: bool
    cause: str = ""
    seconds: float = 0.0
    #: How a failing class is computed: "block-rows" (bitsandbytes' kernel on the weight viewed as one block
    #: per row, checked equal to the reference) or "reference" (llmtune's dequantization); "" when ok.
    fallback: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["key"] = [str(k) for k in self.key]
        return out


_CACHE: dict[tuple[Any, ...], KernelVerdict] = {}


def clear_cache() -> None:
    """Forget every cached verdict (tests that swap kernels call this)."""
    _CACHE.clear()


def reference_absmax(quant_state: Any) -> torch.Tensor:
    """The fp32 absmax per block; double quantization undone (``code2[u8] * absmax2[i // bs2] + offset``)."""
    import torch

    absmax = quant_state.absmax
    if not getattr(quant_state, "nested", False):
        return absmax.float()
    state2 = quant_state.state2
    scales = state2.absmax.float().repeat_interleave(state2.blocksize)[: absmax.numel()]
    offset = quant_state.offset.float() if isinstance(quant_state.offset, torch.Tensor) else float(quant_state.offset)
    return state2.code.float()[absmax.long()] * scales + offset


def reference_dequantize_4bit(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """The weight back from its packed bytes: two 4-bit indices per byte (high nibble first), code, absmax.

    Computed in fp32 and returned in ``quant_state.dtype``, as bitsandbytes' own dequantization does.
    """
    import torch

    code = _CODES.get(quant_state.quant_type)
    if code is None:
        from llmtune.core.errors import InvalidOptionError

        raise InvalidOptionError(f"quant_type={quant_state.quant_type!r} is not nf4 or fp4")
    shape = tuple(quant_state.shape)
    n = 1
    for s in shape:
        n *= s
    flat = packed.contiguous().reshape(-1).view(torch.uint8)
    # one lookup per byte: row b of the table is (code[b >> 4], code[b & 15]), the high nibble first
    values = _byte_table(quant_state.quant_type, flat.device)[flat.long()].reshape(-1)
    blocksize = int(quant_state.blocksize)
    total = -(-n // blocksize) * blocksize  # whole blocks; the last one may be short
    values = values[:n] if total == n else torch.nn.functional.pad(values[:n], (0, total - n))
    absmax = reference_absmax(quant_state).to(flat.device)
    out = (values.view(-1, blocksize) * absmax.view(-1, 1)).reshape(-1)[:n]
    return out.reshape(shape).to(quant_state.dtype)


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _byte_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """``[256, 2]`` fp32: the two code values each packed byte stands for (cached per device)."""
    import torch

    key = (quant_type, str(device))
    if key not in _TABLES:
        code = torch.tensor(_CODES[quant_type], dtype=torch.float32)
        byte = torch.arange(256)
        _TABLES[key] = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1).to(device)
    return _TABLES[key]


def _unpack_cpu_layout(layer: Any) -> None:
    """Undo bitsandbytes' AVX512-BF16 inference repacking (done by a first eval forward), in place."""
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _key(layer: Any) -> tuple[Any, ...]:
    qs = layer.weight.quant_state
    return (int(layer.out_features), int(layer.in_features), int(qs.blocksize), str(qs.quant_type),
            bool(qs.nested), str(layer.compute_dtype), str(layer.weight.dtype), layer.weight.device.type)


def _block_err(theirs: torch.Tensor, ref: torch.Tensor, quant_state: Any) -> float:
    """Largest |theirs - ref| of each block divided by that block's absmax (1.0: off by a whole absmax)."""
    import torch

    bs = int(quant_state.blocksize)
    diff = (theirs.float() - ref.float()).abs().reshape(-1)
    diff = torch.nn.functional.pad(diff, (0, (-diff.numel()) % bs)).view(-1, bs).amax(dim=1)
    absmax = reference_absmax(quant_state).to(diff.device).abs().clamp(min=1e-30)
    return float((diff / absmax[: diff.numel()]).max()) if diff.numel() else 0.0


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _check_forward(layer: Any, weight: torch.Tensor, training: bool) -> str:
    """'' when bitsandbytes' forward of a copy of ``layer`` matches ``F.linear`` with ``weight``, else why not."""
    import torch

    probe = copy.deepcopy(layer)
    probe.train(training)
    dtype = layer.compute_dtype or torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    x_all = torch.randn(3, layer.in_features, generator=gen).to(device=weight.device, dtype=dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(dtype)
    for x in (x_all, x_all[:1]):  # several tokens, and one (bnb has a separate gemv path for it)
        x = x.clone().requires_grad_(training)
        try:
            with torch.set_grad_enabled(training):
                got = probe(x)
        except Exception as exc:  # the kernel is what is being tested: any failure is a verdict
            return f"{'training' if training else 'inference'} forward raised {type(exc).__name__}: {exc}"
        want = torch.nn.functional.linear(x.detach(), weight.to(dtype), bias)
        scale = float((x.detach().abs().float() @ weight.abs().float().t()).max()) or 1.0
        err = _max_err(got.detach(), want) / scale
        if not err <= FORWARD_TOL:
            return (f"{'training' if training else 'inference'} forward differs from the reference by {err:.3g} "
                    f"of max(|x|@|W|) (tolerance {FORWARD_TOL})")
    return ""


def check_dequantize(packed: torch.Tensor, quant_state: Any, reference: torch.Tensor | None = None) -> str:
    """'' when ``bitsandbytes.functional.dequantize_4bit`` gives the reference weight, else what went wrong."""
    import bitsandbytes as bnb

    ref = reference_dequantize_4bit(packed, quant_state) if reference is None else reference
    try:
        theirs = bnb.functional.dequantize_4bit(packed, quant_state)
    except Exception as exc:
        return f"dequantize_4bit raised {type(exc).__name__}: {exc}"
    if tuple(theirs.shape) != tuple(ref.shape):
        return f"dequantize_4bit returned shape {tuple(theirs.shape)}, not {tuple(ref.shape)}"
    err = _block_err(theirs, ref, quant_state)
    if not err <= DEQUANT_TOL:
        return f"dequantize_4bit differs from the reference by up to {err:.3g} of a block's absmax"
    return ""


def check_layer(layer: Any) -> KernelVerdict:
    """The cached verdict for ``layer``'s kernel class (computed now, on a copy, the first time)."""
    import time

    import torch

    key = _key(layer)
    if key in _CACHE:
        return _CACHE[key]
    start = time.perf_counter()
    _unpack_cpu_layout(layer)
    qs = layer.weight.quant_state
    cause = ""
    with torch.no_grad():
        ref = reference_dequantize_4bit(layer.weight.data, qs)
        cause = check_dequantize(layer.weight.data, qs, ref)
    cause = cause or _check_forward(layer, ref, training=False) or _check_forward(layer, ref, training=True)
    if cause:
        fits = working_blocksizes(layer.in_features)
        if fits:
            best = max([b for b in fits if b <= qs.blocksize], default=fits[0])
            cause += f"; blocksize {best} divides in_features={layer.in_features} (rows of whole blocks)"
    fallback = ""
    if cause:
        with torch.no_grad():
            fallback = "block-rows" if _block_rows_ok(layer.weight.data, qs, ref) else "reference"
    verdict = KernelVerdict(key, not cause, cause, time.perf_counter() - start, fallback)
    _CACHE[key] = verdict
    if cause:
        _LOG.info("bitsandbytes 4-bit kernel wrong for %s: %s; computing it on the %s path", key, cause, fallback)
    return verdict


def block_rows_dequantize(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of the weight viewed as ``[numel / blocksize, blocksize]``.

    Every row is then exactly one block, the one shape every kernel gets right; the result is reshaped back.
    Only used for a kernel class where it was checked equal to the reference.
    """
    import bitsandbytes as bnb
    import torch

    shape = tuple(quant_state.shape)
    n = 1
    for s in shape:
        n *= s
    view = copy.copy(quant_state)
    view.shape = torch.Size((n // quant_state.blocksize, quant_state.blocksize))
    return bnb.functional.dequantize_4bit(packed, view).reshape(shape)


def _block_rows_ok(packed: torch.Tensor, quant_state: Any, reference: torch.Tensor) -> bool:
    n = reference.numel()
    if n % quant_state.blocksize:
        return False
    try:
        theirs = block_rows_dequantize(packed, quant_state)
    except Exception:  # a failing kernel just means: use the reference
        return False
    return tuple(theirs.shape) == tuple(reference.shape) and _block_err(theirs, reference, quant_state) <= DEQUANT_TOL


def working_blocksizes(in_features: int) -> list[int]:
    """Blocksizes that divide ``in_features`` (rows made of whole blocks: the shape every kernel handles)."""
    from llmtune.quantizers.bnb import BLOCKSIZES

    return [b for b in BLOCKSIZES if in_features % b == 0]


@functools.lru_cache(maxsize=1)
def reference_linear4bit_class() -> type:
    """``Linear4bit`` whose forward is ``F.linear`` with the reference dequantization (built on first use)."""
    import bitsandbytes as bnb
    import torch

    class ReferenceLinear4bit(bnb.nn.Linear4bit):  # type: ignore[misc, name-defined]
        """A bitsandbytes 4-bit layer computed with llmtune's reference dequantization (a checked kernel failed)."""

        def dequantize(self) -> torch.Tensor:
            """The weight in ``quant_state.dtype``, from the fallback path checked for this layer's class."""
            _unpack_cpu_layout(self)
            weight: Any = self.weight
            if getattr(self, "llmtune_fallback", "reference") == "block-rows":
                return block_rows_dequantize(weight.data, weight.quant_state)
            return reference_dequantize_4bit(weight.data, weight.quant_state)

        @property
        def W_q(self) -> Any:  # the name PEFT looks for
            """PEFT asks a layer that has ``W_q`` to ``dequantize()`` itself (DoRA's weight norm) instead of
            calling bitsandbytes' ``dequantize_4bit``, which is what failed here; it is the packed weight."""
            return self.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = self.compute_dtype or x.dtype
            w = self.dequantize().to(dtype)
            bias = None if self.bias is None else self.bias.to(dtype)
            return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)

    return ReferenceLinear4bit


def guard_4bit_model(model: Any) -> dict[str, Any]:
    """Check every ``Linear4bit`` of ``model``; move those of failing kernel classes to the reference path.

    Returns (and stores as ``model.llmtune_kernel_check``) ``{"checked": n, "routed": [names],
    "verdicts": [...]}``; a model without 4-bit layers gives ``checked == 0``.
    """
    import bitsandbytes as bnb

    routed: list[str] = []
    verdicts: dict[tuple[Any, ...], KernelVerdict] = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for name, layer in layers:
        if getattr(layer.weight, "quant_state", None) is None:
            continue
        _unpack_cpu_layout(layer)
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            # bnb's AVX512-BF16 inference path repacks the weight in place on the first eval forward, rounding
            # absmax to bf16 (what save() writes afterwards is then not what was quantized); keep the stored form
            layer.support_avx512bf16_for_cpu = False
        verdict = check_layer(layer)
        verdicts[verdict.key] = verdict
        if not verdict.ok:
            layer.__class__ = reference_linear4bit_class()
            layer.__dict__["llmtune_fallback"] = verdict.fallback  # plain attribute (not a tensor)
            routed.append(name)
    report = {"checked": len(layers), "routed": routed, "verdicts": [v.as_dict() for v in verdicts.values()]}
    try:
        model.llmtune_kernel_check = report
    except AttributeError:  # pragma: no cover - a model that refuses attributes still gets the routing
        pass
    return report
