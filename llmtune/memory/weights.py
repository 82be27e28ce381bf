"""Bytes of model weights by storage format, including quantization metadata (stdlib only)."""

from __future__ import annotations

from llmtune.core.errors import InvalidOptionError
from llmtune.memory.spec import ModelSpec

#: Weight formats: 16/32-bit floats, bitsandbytes int8/nf4/fp4, GPTQ/AWQ integer groups.
WEIGHT_FORMATS = ("bf16", "fp16", "fp32", "int8", "nf4", "fp4", "gptq", "awq")

NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize (fp32 absmax per block)
NF4_DQ_BLOCK = 256  # double quantization: absmax -> uint8, one fp32 constant per 256 blocks


def default_format(bits: int) -> str:
    """The format a bit width means when only the width is given: 16 -> bf16, 8 -> int8, 4 -> nf4."""
    table = {32: "fp32", 16: "bf16", 8: "int8", 4: "nf4", 3: "gptq", 2: "gptq"}
    if bits not in table:
        raise InvalidOptionError(f"weight_bits={bits!r} is not one of {sorted(table)}")
    return table[bits]


def quantized_bytes_per_param(fmt: str, bits: int = 4, group_size: int = 128, double_quant: bool = True) -> float:
    """Average bytes per quantized weight element, metadata included.

    * nf4/fp4 (bitsandbytes): 4 bits + an fp32 absmax per 64 weights (4.5 bits), or with double
      quantization a uint8 absmax per 64 plus an fp32 constant per 256 blocks (4.127 bits; QLoRA paper).
    * int8 (LLM.int8): 1 byte + an fp32 scale per output row (added separately, per row).
    * gptq/awq: ``bits`` + an fp16 scale and a packed ``bits``-bit zero point per group of ``group_size``.
    """
    if fmt in ("nf4", "fp4"):
        meta = (1 / NF4_BLOCK + 4 / (NF4_BLOCK * NF4_DQ_BLOCK)) if double_quant else 4 / NF4_BLOCK
        return 0.5 + meta
    if fmt == "int8":
        return 1.0
    if fmt in ("gptq", "awq"):
        if bits not in (2, 3, 4, 8):
            raise InvalidOptionError(f"weight_bits={bits} is not a GPTQ/AWQ width (2, 3, 4 or 8)")
        if group_size <= 0:
            raise InvalidOptionError(f"group_size={group_size} must be > 0")
        return bits / 8 + (2 + bits / 8) / group_size
    raise InvalidOptionError(f"{fmt!r} is not a quantized format")


def weight_terms(spec: ModelSpec, fmt: str, *, bits: int = 16, group_size: int = 128, double_quant: bool = True,
                 upcast_fp32: bool = False) -> dict[str, int]:
    """Weight bytes split into terms: quantized linears, their metadata, embeddings/lm_head, norms.

    Quantizers leave embeddings, lm_head and norms in 16 bits; ``upcast_fp32`` models PEFT's
    ``prepare_model_for_kbit_training``, which casts every non-quantized parameter to fp32.
    """
    if fmt not in WEIGHT_FORMATS:
        raise InvalidOptionError(f"weight format {fmt!r} is not one of {WEIGHT_FORMATS}")
    dense = {"bf16": 2, "fp16": 2, "fp32": 4}
    if fmt in dense:
        return {"weights": spec.num_params * dense[fmt]}
    other_bytes = 4 if upcast_fp32 else 2
    lin = spec.quantizable_params
    per = quantized_bytes_per_param(fmt, bits, group_size, double_quant)
    data = int(lin * (0.5 if fmt in ("nf4", "fp4") else (1.0 if fmt == "int8" else bits / 8)))
    meta = round(lin * per) - data
    if fmt == "int8":  # one fp32 scale (SCB) per output row of every linear
        meta = spec.num_layers * sum(4 * x.out_features * x.count for x in spec.layer_linears())
    if fmt in ("gptq", "awq"):  # GPTQ keeps an int32 g_idx per input feature (act-order permutation)
        meta += spec.num_layers * sum(4 * x.in_features * x.count for x in spec.layer_linears()) if fmt == "gptq" else 0
    return {
        f"weights_{fmt}": data,
        f"quant_metadata_{fmt}": meta,
        "embeddings_lm_head": (spec.embedding_params + spec.lm_head_params) * other_bytes,
        "norms": (spec.norm_params + spec.num_layers * spec.layer_other_params) * other_bytes,
    }
