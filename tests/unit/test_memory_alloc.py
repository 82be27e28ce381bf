"""Allocator rounding, bitsandbytes' quantization state, the loading peak, cuBLAS handles, _safe_softmax.

Each term of llmtune.memory.weights / attention is checked against the library that allocates it, run on
the CPU here: bitsandbytes' ``quantize_4bit`` (the tensors of one ``Params4bit``) and PyTorch's profiler
(what ``aten::_safe_softmax`` allocates inside the math SDPA kernel).
"""

from __future__ import annotations

import pytest

from llmtune.core.errors import InvalidOptionError
from llmtune.memory import ModelSpec, estimate_serving, estimate_weights
from llmtune.memory.attention import softmax_forward_transient
from llmtune.memory.weights import (
    allocator_block_bytes,
    bnb4_linear_bytes,
    checkpoint_order,
    loading_peak_extra,
    quantize_temporaries,
)

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

MiB = 2**20
SPEC_1B = ModelSpec.from_preset("llama-3.2-1b")


def test_allocator_block_rounding():
    """CUDACachingAllocator: 512 B blocks; > 10 MiB from a fresh 2 MiB-rounded segment, kept whole when at
    most 1 MiB would remain (a 501 MiB logits tensor counts 502 MiB; 2004 MiB counts 2004 MiB)."""
    assert allocator_block_bytes(0) == 0
    assert allocator_block_bytes(1) == 512
    assert allocator_block_bytes(4 * MiB + 1) == 4 * MiB + 512  # 20 MiB segment, split
    assert allocator_block_bytes(501 * MiB) == 502 * MiB
    assert allocator_block_bytes(2004 * MiB) == 2004 * MiB
    assert allocator_block_bytes(500 * MiB + 512 * 1024) == 500 * MiB + 512 * 1024  # 1.5 MiB would remain: split
    assert allocator_block_bytes(501 * MiB, fresh_segment=False) == 501 * MiB


@pytest.mark.parametrize("shape", [(512, 2048), (2048, 2048), (8192, 2048), (333, 77)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb4_state_bytes_equal_bitsandbytes(shape, double_quant):
    """bnb4_linear_bytes equals the 512 B-rounded sizes of every tensor bitsandbytes' quantize_4bit returns
    (packed data, absmax, code, and with double quantization offset, state2 absmax and state2 code)."""
    torch = pytest.importorskip("torch")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(*shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    tensors = [st.absmax, st.code]
    if double_quant:
        tensors += [st.offset, st.state2.absmax, st.state2.code]
    meta = sum(allocator_block_bytes(t.nbytes, fresh_segment=False) for t in tensors)
    data, predicted_meta = bnb4_linear_bytes(w.numel(), double_quant)
    assert data == allocator_block_bytes(q.nbytes, fresh_segment=False)
    assert predicted_meta == meta


def test_nf4_loaded_and_loading_peak_match_h100():
    """h100-llama3.2-1b.json weights-nf4: 980.1 MiB after load, peak 1008.9 MiB; weights-int8: 1430.6 / 1484.5.
    The peak is the last layer's up_proj being quantized (self_attn.* still to come in key order); tol 0.1%."""
    order = [name for name, _ in checkpoint_order(SPEC_1B)]
    assert order == ["down_proj", "gate_proj", "up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    for bits, loaded, peak in ((4, 980.1, 1008.9), (8, 1430.6, 1484.5)):
        e = estimate_weights(SPEC_1B, bits)
        assert abs(e.phases["loaded"] / MiB / loaded - 1) <= 0.001
        assert abs(e.peak_tensor_bytes / MiB / peak - 1) <= 0.001
    temps, later = loading_peak_extra(SPEC_1B, "nf4")
    n = 2048 * 8192
    assert temps == quantize_temporaries("nf4", n) == 2 * n + 2 * 4 * (n // 64)
    attention = (2048 * 512, 2048 * 2048, 2048 * 2048, 2048 * 512)  # k, o, q, v: loaded after up_proj
    assert later == sum(sum(bnb4_linear_bytes(m)) for m in attention)


def test_cublas_handles_add_workspaces_and_are_checked():
    """Each cuBLAS handle with a workspace adds workspace_bytes; a bad count is a typed error."""
    one = estimate_serving(SPEC_1B, 16, batch_size=1, seq_len=128)
    two = estimate_serving(SPEC_1B, 16, batch_size=1, seq_len=128, cublas_handles=2)
    assert two.peak_tensor_bytes - one.peak_tensor_bytes == 32 * MiB
    with pytest.raises(InvalidOptionError, match="cublas_handles"):
        estimate_serving(SPEC_1B, 16, cublas_handles=0)


def test_safe_softmax_transient_matches_cpu_profiler():
    """Inside the math SDPA kernel, aten::_safe_softmax allocates its softmax output (kept, 4 B/element) and
    a bool isneginf mask (1 B/element) while the caller still holds the fp32 scores (4 B): the transient
    beyond the saved output is 5 B per element = softmax_forward_transient / heads; tol 1%."""
    torch = pytest.importorskip("torch")
    from torch.profiler import ProfilerActivity, profile

    b, heads, s = 2, 4, 256
    x = torch.randn(b, heads, s, s, generator=torch.Generator().manual_seed(0))
    x = x.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = torch.ops.aten._safe_softmax(x, -1)
    n = x.numel()
    allocated = sum(e.self_cpu_memory_usage for e in prof.key_averages()
                    if e.key != "aten::_safe_softmax" and e.self_cpu_memory_usage > 0)
    assert y.nbytes == 4 * n
    extra_per_element = 4 + (allocated - y.nbytes) / n  # the held scores + what the op adds beyond its output
    spec = ModelSpec.from_hf_config(dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688,
                                          num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2))
    predicted = softmax_forward_transient(spec, "math") / heads
    assert abs(predicted / extra_per_element - 1) <= 0.01, (predicted, extra_per_element)
    assert softmax_forward_transient(spec, "flash") == 0.0
