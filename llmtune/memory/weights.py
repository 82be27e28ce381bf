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
    if fmt in ("nf4", "fp4"):  # per linear, as bitsandbytes allocates it (tensor by tensor, 512 B blocks)
        per_lin = [bnb4_linear_bytes(x.in_features * x.out_features, double_quant)
                   for x in spec.layer_linears() for _ in range(x.count)]
        data = spec.num_layers * sum(d for d, _ in per_lin)
        meta = spec.num_layers * sum(m for _, m in per_lin)
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


# ---------------------------------------------------------------------------------------------- allocator
#: PyTorch's CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp): every block is a multiple of 512 B
#: (kMinBlockSize); requests above 10 MiB (kMinLargeAlloc) get a fresh segment rounded up to 2 MiB
#: (kRoundLarge), and a large-pool block is split only when more than 1 MiB (kSmallSize) would remain.
ALLOC_MIN_BLOCK = 512
ALLOC_SMALL_SIZE = 1 << 20
ALLOC_MIN_LARGE = 10 << 20
ALLOC_ROUND_LARGE = 2 << 20


def allocator_block_bytes(nbytes: int, fresh_segment: bool = True) -> int:
    """Bytes ``max_memory_allocated`` counts for one tensor of ``nbytes``.

    Rounded up to 512 B; a request above 10 MiB served by a fresh 2 MiB-rounded segment keeps the whole
    segment when the remainder is 1 MiB or less (the block is not split), so a 501 MiB tensor counts 502 MiB.
    """
    if nbytes <= 0:
        return 0
    size = -(-nbytes // ALLOC_MIN_BLOCK) * ALLOC_MIN_BLOCK
    if fresh_segment and size > ALLOC_MIN_LARGE:
        segment = -(-size // ALLOC_ROUND_LARGE) * ALLOC_ROUND_LARGE
        if segment - size <= ALLOC_SMALL_SIZE:
            return segment
    return size


def _blocks(*sizes: float) -> int:
    """Sum of 512 B-rounded blocks (tensors carved from small/20 MiB segments: always split)."""
    return sum(allocator_block_bytes(int(-(-s // 1)), fresh_segment=False) for s in sizes)


def bnb4_linear_bytes(n: int, double_quant: bool = True) -> tuple[int, int]:
    """(packed data, quant_state) bytes of one bitsandbytes ``Params4bit`` of ``n`` weights, as allocated.

    ``quantize_4bit`` packs two 4-bit codes per uint8 (``ceil(n / 2)``) and keeps per tensor: the 16-entry
    fp32 code table (``get_4bit_type``) and the absmax per 64 weights; with double quantization the absmax is
    stored as uint8 (``quantize_blockwise`` with blocksize 256) plus the fp32 mean ``offset`` (a 0-dim tensor),
    ``state2``'s fp32 absmax per 256 blocks and its own copy of the 256-entry fp32 dynamic code. Each tensor
    is its own allocator block (512 B multiple). (tests: equal to bitsandbytes' ``quantize_4bit`` output.)
    """
    blocks = -(-n // NF4_BLOCK)
    data = _blocks(-(-n // 2))
    if double_quant:
        meta = _blocks(blocks, 4 * -(-blocks // NF4_DQ_BLOCK), 4, 4 * 16, 4 * 256)
    else:
        meta = _blocks(4 * blocks, 4 * 16)
    return data, meta


def quantize_temporaries(fmt: str, n: int, double_quant: bool = True) -> int:
    """Bytes alive, besides the result, while bitsandbytes quantizes one ``n``-weight bf16 linear on the GPU.

    * nf4/fp4 (``Params4bit._quantize``): the bf16 weight (already on the device, ``.to`` is a no-op) and
      ``quantize_4bit``'s fp32 absmax per 64; with double quantization also ``absmax - offset`` (fp32) while
      ``quantize_blockwise`` writes the uint8 absmax.
    * int8 (``Int8Params._quantize``): the bf16 weight and its fp16 copy (``.to(device, float16)``) while
      ``int8_vectorwise_quant`` writes the int8 rows and fp32 scales.
    """
    blocks = -(-n // NF4_BLOCK)
    if fmt in ("nf4", "fp4"):
        return _blocks(2 * n, 4 * blocks) + (_blocks(4 * blocks) if double_quant else 0)
    if fmt == "int8":
        return _blocks(2 * n, 2 * n)
    return _blocks(2 * n)


_ATTENTION_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query_key_value", "dense"})
_ATTENTION_BLOCK = {"gpt2": "attn", "gpt_neox": "attention", "falcon": "self_attention"}


def checkpoint_order(spec: ModelSpec) -> list[tuple[str, int]]:
    """One decoder layer's linears as ``(name, weights)`` in checkpoint key order (transformers' module paths,
    sorted: ``mlp.*`` before ``self_attn.*`` for Llama-style names); experts are left out."""
    def key(name: str) -> str:
        block = _ATTENTION_BLOCK.get(spec.family, "self_attn") if name in _ATTENTION_LINEARS else "mlp"
        return f"{block}.{name}"
    lins = sorted((x for x in spec.layer_linears() if not x.expert), key=lambda x: key(x.name))
    return [(x.name, x.in_features * x.out_features) for x in lins for _ in range(x.count)]


def result_bytes(fmt: str, n: int, out_features: int, double_quant: bool = True) -> int:
    """Bytes one quantized linear of ``n`` weights keeps after loading (data + quantization state)."""
    if fmt in ("nf4", "fp4"):
        return sum(bnb4_linear_bytes(n, double_quant))
    if fmt == "int8":
        return _blocks(n, 4 * out_features)
    return _blocks(n * 2)


def loading_peak_extra(spec: ModelSpec, fmt: str, double_quant: bool = True) -> tuple[int, int]:
    """(temporaries, weights not loaded yet) at the loading peak of a bitsandbytes model.

    transformers loads the checkpoint key by key and bitsandbytes quantizes each linear on the GPU as it
    arrives, so the peak is the moment of quantizing some linear of the last layer: every weight before it is
    loaded (quantized), the ones after it in key order are not, and that linear's quantization temporaries
    (``quantize_temporaries``) are alive. Returns the maximising pair.
    """
    order = checkpoint_order(spec)
    outs = {x.name: x.out_features for x in spec.layer_linears()}
    best = (0, 0)
    for i, (_name, n) in enumerate(order):
        later = sum(result_bytes(fmt, m, outs[nm], double_quant) for nm, m in order[i + 1:])
        temps = quantize_temporaries(fmt, n, double_quant)
        if temps - later > best[0] - best[1]:
            best = (temps, later)
    return best
