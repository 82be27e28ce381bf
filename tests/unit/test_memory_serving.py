"""vLLM serving capacity: the block pool, tokens of KV cache, concurrency, tensor parallelism, prefix caching."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from llmtune.cli.main import app
from llmtune.core.errors import InvalidOptionError
from llmtune.memory import GPUS, ModelSpec, estimate_serving

MiB = 2**20
OPT_13B = ModelSpec(name="opt-13b", family="generic", vocab_size=50272, hidden_size=5120, intermediate_size=20480,
                    num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, mlp="plain", activation="gelu",
                    norm="layernorm")


def test_opt13b_kv_per_token_pagedattention_paper():
    """PagedAttention paper (arXiv 2309.06180) section 3: OPT-13B keeps 800 KB of KV per token
    (2 x 5120 hidden x 40 layers x 2 bytes = 819,200 B); vLLM's page is 16 tokens of that per layer. Exact."""
    cap = estimate_serving(OPT_13B, 16, engine="vllm", gpu="A100-40GB", vllm={"max_model_len": 2048}).capacity
    assert cap is not None
    assert cap.kv_bytes_per_token == 819_200 == 800 * 1024
    assert cap.page_bytes_per_layer == 2 * 16 * 40 * 128 * 2
    assert cap.blocks_per_sequence(2048) == 128  # 1.6 GB per 2048-token request, as the paper says
    assert abs(cap.blocks_per_sequence(2048) * cap.page_bytes_per_layer * 40 / 1.6e9 - 1) < 0.05


def test_llama31_8b_a100_80_hand_calculation():
    """Every step of vLLM's sizing by hand: requested, non-KV, blocks, tokens, users at 4k context."""
    spec = ModelSpec.from_preset("llama-3.1-8b")
    e = estimate_serving(spec, 16, engine="vllm", gpu="A100-80GB", vllm={"max_model_len": 8192})
    cap = e.capacity
    assert cap is not None
    requested = math.ceil(GPUS["A100-80GB"] * 0.9)
    weights = 8_030_261_248 * 2 + 32 * MiB  # bf16 weights + cuBLAS workspace
    layer = 2 * 8192 * (3 * 4096 + (4096 + 2 * 1024) + 4096 + 3 * 14336)  # profiling run, 8192 tokens
    sampler = 256 * 128256 * (2 + 8)  # 256 dummy requests' logits (bf16) + fp32 logits and probabilities
    page = 2 * 16 * 8 * 128 * 2  # one layer, one block of 16 tokens
    blocks = (requested - weights - layer - sampler) // page // 32
    assert cap.requested_bytes == requested and cap.num_blocks == blocks
    assert cap.kv_tokens == 16 * blocks and cap.kv_bytes_per_token == 128 * 1024
    assert cap.concurrent_sequences(4096) == min(256, blocks // 256)
    assert cap.max_concurrency() == 16 * blocks / 8192
    assert e.peak_phase == "serving" and e.breakdown["kv_cache_pool"] == blocks * page * 32


def test_tensor_parallel_splits_heads_and_weights():
    """TP 4: each GPU holds 2 of Llama-3.1-70B's 8 kv heads and a quarter of the weights; TP 16 replicates
    (one kv head per GPU, as vLLM does when kv heads < tp)."""
    spec = ModelSpec.from_preset("llama-3.1-70b")
    tp4 = estimate_serving(spec, 16, engine="vllm", gpu="H100", gpus=4, vllm={"max_model_len": 8192}).capacity
    assert tp4 is not None and tp4.kv_bytes_per_token == 2 * 2 * 128 * 2 * 80
    tp16 = estimate_serving(spec, 16, engine="vllm", gpu="H100", gpus=16, vllm={"max_model_len": 8192}).capacity
    assert tp16 is not None and tp16.kv_bytes_per_token == 2 * 1 * 128 * 2 * 80
    with pytest.raises(InvalidOptionError, match="cannot start"):
        estimate_serving(spec, 16, engine="vllm", gpu="H100", gpus=1)  # 141 GB of bf16 weights on 80 GB


def test_prefix_caching_and_limits():
    spec = ModelSpec.from_preset("llama-3.1-8b")
    kw = dict(engine="vllm", gpu="L4")
    plain = estimate_serving(spec, 4, **kw, vllm={"max_model_len": 8192}).capacity
    shared = estimate_serving(spec, 4, **kw, vllm={"max_model_len": 8192, "shared_prefix_tokens": 2048}).capacity
    assert plain is not None and shared is not None
    assert shared.blocks_per_sequence(4096) == plain.blocks_per_sequence(4096) - 128
    assert shared.concurrent_sequences(4096) > plain.concurrent_sequences(4096)
    few = estimate_serving(spec, 4, **kw, vllm={"max_model_len": 8192, "max_num_seqs": 2}).capacity
    assert few is not None and few.concurrent_sequences(16) == 2
    with pytest.raises(InvalidOptionError, match="max_model_len"):
        plain.concurrent_sequences(9000)
    with pytest.raises(InvalidOptionError, match="gpu_memory_utilization"):
        estimate_serving(spec, 4, **kw, vllm={"gpu_memory_utilization": 1.5})
    with pytest.raises(InvalidOptionError, match="block_sise"):
        estimate_serving(spec, 4, **kw, vllm={"block_sise": 32})
    with pytest.raises(InvalidOptionError, match="engine"):
        estimate_serving(spec, 4, engine="tgi")


def test_cli_how_many_users_at_4k():
    r = CliRunner().invoke(app, ["memory", "llama-3.1-8b", "--serve", "--engine", "vllm", "--gpu", "A100-80",
                                 "--seq", "4096", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    cap = estimate_serving(ModelSpec.from_preset("llama-3.1-8b"), 16, engine="vllm", gpu="A100-80",
                           vllm={"max_model_len": 8192}).capacity
    assert cap is not None and out["concurrent_sequences"] == cap.concurrent_sequences(4096)
    assert out["capacity"]["kv_tokens"] == cap.kv_tokens
    r = CliRunner().invoke(app, ["memory", "llama-3.1-8b", "--serve", "--engine", "vllm", "--gpu", "A100-80",
                                 "--seq", "4096"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "concurrent sequences of 4,096 tokens" in r.output and "tokens of KV cache" in r.output


@pytest.mark.parametrize(("options", "message"), [
    ({"non_torch_bytes": -10**12}, "vllm option non_torch_bytes must be an integer >= 0, got -1000000000000"),
    ({"cudagraph_bytes": -1}, "vllm option cudagraph_bytes must be an integer >= 0"),
    ({"non_torch_bytes": 10**15}, "non_torch_bytes=1,000,000,000,000,000 is more than the"),
    ({"shared_prefix_tokens": -3}, "shared_prefix_tokens must be an integer >= 0"),
    ({"shared_prefix_tokens": 9000, "max_model_len": 8192}, "shared_prefix_tokens=9000 exceeds max_model_len=8192"),
    ({"non_torch_bytes": 1.5e9}, "non_torch_bytes must be an integer >= 0, got 1500000000.0"),
    ({"gpu_memory_utilization": "0.9"}, "gpu_memory_utilization='0.9' must be int or float"),
])
def test_negative_or_absurd_vllm_options_are_errors(options, message):
    """A negative non_torch_bytes used to grow the KV pool past the GPU (1.08 TB reported on an 80 GB H100)."""
    spec = ModelSpec.from_preset("llama-3.1-8b")
    with pytest.raises(InvalidOptionError, match=message.replace("(", r"\(").replace(".", r"\.")) as err:
        estimate_serving(spec, 16, engine="vllm", gpu="H100", vllm=options)
    assert err.value.field == next(iter(options))
    fine = estimate_serving(spec, 16, engine="vllm", gpu="H100", vllm={"non_torch_bytes": 2 * 2**30})
    assert fine.device_bytes <= GPUS["H100-80GB"]
