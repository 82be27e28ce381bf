"""The NF4/FP4 storage format, checked against an independent reference written from the format alone.

The reference below knows only the 16-entry code tables, blockwise absmax scaling, high-nibble-first
packing and (for double quantization) ``absmax = nested_code[u8] * nested_absmax[i // 256] + offset``.
It must reproduce bitsandbytes' packed bytes, absmax and dequantized weights exactly.
"""

from __future__ import annotations

import statistics

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from llmtune.quantizers.bnb_guard import (  # noqa: E402 (after the importorskips)
    FP4_CODE as LIB_FP4_CODE,
)
from llmtune.quantizers.bnb_guard import (  # noqa: E402
    NF4_CODE as LIB_NF4_CODE,
)
from llmtune.quantizers.bnb_guard import (  # noqa: E402
    check_dequantize,
    reference_dequantize_4bit,
)

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

# The NF4 code (QLoRA, appendix E), as printed in bitsandbytes' get_4bit_type("nf4").
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# FP4 (E2M1, bias 2) in bit-pattern order: bit 3 is the sign; normalised by the largest magnitude, 12.
FP4_CODE = [v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3)]
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def normal_float_code(offset: float = 0.9677083) -> list[float]:
    """NF4 rebuilt from the standard normal's quantiles (stdlib, no scipy): 8 positive, 7 negative, exact 0."""
    ppf = statistics.NormalDist().inv_cdf

    def linspace(a: float, b: float, n: int) -> list[float]:
        return [a + (b - a) * i / (n - 1) for i in range(n)]

    positive = [ppf(p) for p in linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in linspace(offset, 0.5, 8)[:-1]]
    values = sorted([*positive, 0.0, *negative])
    top = max(abs(v) for v in values)
    return [v / top for v in values]


def ref_quantize_4bit(w: torch.Tensor, code: list[float], blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed bytes and fp32 absmax: each block scaled by its absmax, each value to the nearest code entry.

    Decision boundaries are the fp32 midpoints of neighbouring sorted code values; a value exactly on one
    (bf16 inputs hit them) goes to the lower code. FP4 has two zeros, +0 (0b0000) sorted before -0
    (0b1000), so small positive values get -0 (both decode to 0): bitsandbytes does the same.
    """
    flat = w.reshape(-1).float()
    blocks = list(torch.split(flat, blocksize))  # the last block may be shorter
    absmax = torch.stack([b.abs().max() for b in blocks])
    table = torch.tensor(code, dtype=torch.float32)
    order = torch.tensor(sorted(range(len(code)), key=lambda i: (code[i], str(code[i]).startswith("-"))))
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    idx = []
    for block, scale in zip(blocks, absmax):
        scaled = (block * (1.0 / scale.clamp(min=1e-38))).clamp(-1, 1)  # times the fp32 reciprocal, as bnb
        # nearest code value: the decision boundaries are the fp32 midpoints of neighbouring sorted values,
        # and a value exactly on a boundary goes to the lower one
        slot = (scaled[:, None] > midpoints[None, :]).sum(dim=1)
        idx.append(order[slot])
    q = torch.cat(idx).to(torch.uint8)
    if q.numel() % 2:  # an odd count is padded with the code of 0.0
        q = torch.cat([q, table.abs().argmin().to(torch.uint8).reshape(1)])
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def ref_dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: list[float], blocksize: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """The fp32 weight back: unpack two indices per byte (high nibble first), look up, scale per block."""
    flat = packed.reshape(-1).view(torch.uint8)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()
    n = 1
    for s in shape:
        n *= s
    values = torch.tensor(code, dtype=torch.float32)[idx[:n]]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).reshape(shape)


def ref_nested_absmax(absmax_u8: torch.Tensor, nested_code: torch.Tensor, nested_absmax: torch.Tensor,
                      offset: float, nested_blocksize: int = 256) -> torch.Tensor:
    """Double quantization undone: 8-bit code value times its block's scale, plus the mean removed before."""
    scales = nested_absmax.repeat_interleave(nested_blocksize)[: absmax_u8.numel()]
    return nested_code[absmax_u8.long()] * scales + torch.tensor(offset, dtype=torch.float32)


def test_nf4_table_equals_bnb_and_the_normal_quantile_construction() -> None:
    bnb_code = bnb.functional.get_4bit_type("nf4", device="cpu")
    assert bnb_code.tolist() == torch.tensor(NF4_CODE, dtype=torch.float32).tolist()
    rebuilt = normal_float_code()
    assert max(abs(a - b) for a, b in zip(rebuilt, NF4_CODE)) < 1e-6
    assert bnb.functional.get_4bit_type("fp4", device="cpu").tolist() == torch.tensor(FP4_CODE).tolist()
    assert list(LIB_NF4_CODE) == NF4_CODE and list(LIB_FP4_CODE) == FP4_CODE  # the library's tables


CASES = [  # (shape, blocksize, dtype); 7*34 leaves a short last block; an odd last dimension (5, 33) takes
    # bnb's torch.compile'd fallback kernel instead of the C++ one (compiling is slow, so once)
    *[(shape, bs, dt) for shape, bs in [((96, 64), 64), ((48, 80), 128), ((7, 34), 64), ((64, 64), 32)]
      for dt in (torch.float32, torch.bfloat16)],
    ((5, 33), 64, torch.float32),
]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize", "dtype"), CASES)
def test_reference_matches_bnb_bytes_absmax_and_dequantization(quant_type, shape, blocksize, dtype) -> None:
    gen = torch.Generator().manual_seed(sum(shape) + blocksize)
    w = (torch.randn(shape, generator=gen) * 0.05).to(dtype)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                 compress_statistics=False)
    ref_packed, ref_absmax = ref_quantize_4bit(w, CODES[quant_type], blocksize)
    assert torch.equal(packed.reshape(-1), ref_packed)
    assert torch.equal(state.absmax, ref_absmax)
    ours = ref_dequantize_4bit(packed, state.absmax, CODES[quant_type], blocksize, shape)
    assert torch.equal(reference_dequantize_4bit(packed, state), ours.to(dtype))  # llmtune's own reference
    theirs = bnb.functional.dequantize_4bit(packed, state)
    assert theirs.dtype == dtype
    # bitsandbytes' kernel depends on the CPU (AVX-512's is wrong for rows that are not whole blocks); whatever
    # it does here, llmtune's self-check must say so: it passes exactly when the kernel equals the reference
    assert (check_dequantize(packed, state) == "") == torch.equal(theirs, ours.to(dtype))
    if shape[-1] % blocksize == 0:  # rows of whole blocks: every kernel gets these right
        assert torch.equal(theirs, ours.to(dtype))
    # and the dequantized weight is within half a code step of the original, block by block
    max_gap = max(b - a for a, b in zip(sorted(CODES[quant_type]), sorted(CODES[quant_type])[1:]))
    err = (ours - w.float()).abs().reshape(-1)
    bound = ref_absmax.repeat_interleave(blocksize)[: err.numel()] * max_gap / 2
    assert bool((err <= bound * (1 + 1e-6) + 1e-12).all())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantization_reference(quant_type) -> None:
    w = torch.randn(256, 192, generator=torch.Generator().manual_seed(7)) * 0.02
    plain, plain_state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                      compress_statistics=False)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert torch.equal(packed, plain)  # the 4-bit indices come from the exact absmax; only absmax is compressed
    absmax = ref_nested_absmax(state.absmax, state.state2.code, state.state2.absmax, state.offset.item())
    assert float((absmax - plain_state.absmax).abs().max()) < 0.01 * float(plain_state.absmax.max())
    ours = ref_dequantize_4bit(packed, absmax, CODES[quant_type], 64, tuple(w.shape))
    assert torch.equal(bnb.functional.dequantize_4bit(packed, state), ours)  # 192 = 3 blocks of 64: rows whole
    assert torch.equal(reference_dequantize_4bit(packed, state), ours)


def test_storage_dtype_only_reinterprets_the_bytes() -> None:
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    as_u8, _ = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.uint8)
    as_bf16, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16.reshape(-1).view(torch.uint8), as_u8.reshape(-1))
    assert torch.equal(bnb.functional.dequantize_4bit(as_bf16, state),
                       ref_dequantize_4bit(as_u8, state.absmax if not state.nested else
                                           ref_nested_absmax(state.absmax, state.state2.code, state.state2.absmax,
                                                             state.offset.item()), NF4_CODE, 64, (64, 64)))


def test_packing_puts_the_first_value_in_the_high_nibble() -> None:
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # NF4 index 0 and 15
    packed, _ = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert packed.reshape(-1)[0].item() == 0x0F
    assert ref_quantize_4bit(w, NF4_CODE, 64)[0][0].item() == 0x0F


@pytest.mark.parametrize(("name", "options"), [("nf4", {}), ("fp4", {"double_quant": False, "blocksize": 128})])
def test_a_quantized_model_dequantizes_like_bnb_and_the_reference(tmp_path, name, options) -> None:
    """Read the saved safetensors as plain tensors + JSON and rebuild every weight with the reference."""
    import json

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, LlamaConfig

    import llmtune

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    q = llmtune.get_quantizer(name, **options)
    q.quantize(model)
    saved = q.save(model, tmp_path / name)
    layers = model.llmtune_quantization["quantized_modules"]
    assert len(layers) == 7
    with safe_open(str(saved / "model.safetensors"), "pt") as f:
        for layer_name in layers:
            key = f"{layer_name}.weight"
            meta = json.loads(bytes(f.get_tensor(f"{key}.quant_state.bitsandbytes__{name}").tolist()).decode())
            assert meta["quant_type"] == name and meta["blocksize"] == q.options.blocksize
            assert f.get_tensor(f"{key}.quant_map").tolist() == torch.tensor(CODES[name]).tolist()
            absmax = f.get_tensor(f"{key}.absmax")
            if q.options.double_quant:
                absmax = ref_nested_absmax(absmax, f.get_tensor(f"{key}.nested_quant_map"),
                                           f.get_tensor(f"{key}.nested_absmax"), meta["nested_offset"],
                                           meta["nested_blocksize"])
            ours = ref_dequantize_4bit(f.get_tensor(key), absmax, CODES[name], meta["blocksize"],
                                       tuple(meta["shape"]))
            layer = model.get_submodule(layer_name)
            weight = layer.weight
            assert torch.equal(reference_dequantize_4bit(weight.data, weight.quant_state), ours), layer_name
            # bitsandbytes' kernel is used only where it gives the reference weight; elsewhere the layer is routed
            bnb_ok = torch.equal(bnb.functional.dequantize_4bit(weight.data, weight.quant_state), ours)
            routed = layer_name in model.llmtune_kernel_check["routed"]
            assert routed == (not bnb_ok) and routed == (type(layer) is not bnb.nn.Linear4bit), layer_name
            w = original[layer_name]
            assert ours.shape == w.shape
            # within half the widest code gap of each block's absmax (+1% for a double-quantized absmax)
            gap = max(b - a for a, b in zip(sorted(CODES[name]), sorted(CODES[name])[1:]))
            block_max = w.reshape(-1, meta["blocksize"]).abs().amax(dim=1).repeat_interleave(meta["blocksize"])
            assert bool(((ours - w).abs().reshape(-1) <= block_max * (gap / 2 + 0.01)).all()), layer_name
