"""llmtune.memory: measured H100 cases, published data points, parameter counts, bad input, phases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.memory import (
    GPUS,
    PRESETS,
    ModelSpec,
    estimate_serving,
    estimate_training,
    estimate_weights,
    lora_params,
    max_batch_size,
    max_seq_len,
    resolve_lora_targets,
    rule_of_thumb_serving_gb,
)
from llmtune.memory.mechanisms import PAIR_BATCH_BYTES, PAIR_LOSS_BYTES
from llmtune.memory.recipes import hf_recipe
from llmtune.memory.weights import quantized_bytes_per_param

MiB = 2**20

# ------------------------------------------------------------------------------------------------ measured cases
# Source: shared/memory/h100-llama3.2-1b.json (NVIDIA H100 80GB, torch 2.11+cu130, transformers 5.17,
# peft 0.21, bitsandbytes 0.50.2; random-init Llama-3.2-1B architecture; reference_recipe.py).
# (case name, kind, method, bits, gradient checkpointing, batch, seq, peak_alloc_MiB = max_memory_allocated)
H100_CASES = [
    ("weights-bf16", "load", None, 16, None, None, None, 2358.1),
    ("weights-nf4", "load", None, 4, None, None, None, 1008.9),
    ("weights-int8", "load", None, 8, None, None, None, 1484.5),
    ("infer-bf16(first)", "infer", None, 16, None, 4, 512, 2964.1),
    ("infer-nf4", "infer", None, 4, None, 4, 512, 1619.1),
    ("b4s512/lora-bf16-gc", "train", "lora", 16, True, 4, 512, 6202.3),
    ("b4s512/qlora-nf4-gc", "train", "qlora", 4, True, 4, 512, 5954.5),
    ("b4s512/lora-bf16", "train", "lora", 16, False, 4, 512, 11004.5),
    ("b4s512/full-bf16-adamw-gc", "train", "full", 16, True, 4, 512, 12355.7),
    ("b4s512/infer-bf16", "infer", None, 16, None, 4, 512, 2996.1),
    ("b1s2048/lora-bf16-gc", "train", "lora", 16, True, 1, 2048, 6202.7),
    ("b1s2048/qlora-nf4-gc", "train", "qlora", 4, True, 1, 2048, 5956.3),
    ("b1s2048/lora-bf16", "train", "lora", 16, False, 1, 2048, 11004.9),
    ("b1s2048/full-bf16-adamw-gc", "train", "full", 16, True, 1, 2048, 12356.7),
    ("b1s2048/infer-bf16", "infer", None, 16, None, 1, 2048, 2996.1),
    ("b8s1024/lora-bf16-gc", "train", "lora", 16, True, 8, 1024, 17155.5),
    ("b8s1024/qlora-nf4-gc", "train", "qlora", 4, True, 8, 1024, 18795.8),
    ("b8s1024/lora-bf16", "train", "lora", 16, False, 8, 1024, 36364.5),
    ("b8s1024/full-bf16-adamw-gc", "train", "full", 16, True, 8, 1024, 21804.7),
    ("b8s1024/infer-bf16", "infer", None, 16, None, 8, 1024, 4713.2),
]
# Unsloth 2026.10.9 on the same machine and shapes (use_gradient_checkpointing="unsloth"); not fitted to.
H100_UNSLOTH = [
    ("b4s512/unsloth-lora-bf16-gc", "lora", 4, 512, 2883.7),
    ("b4s512/unsloth-qlora-nf4-gc", "qlora", 4, 512, 1506.7),
]
SPEC_1B = ModelSpec.from_preset("llama-3.2-1b")
#: the plain recipe as the measured versions ran it (reentrant kbit checkpointing), whatever is installed here
HF_MEASURED = hf_recipe("0.21.0", "5.17.0")


# The inference cases measured after a training case find the autograd thread's cuBLAS handle (and its
# 32 MiB workspace) still allocated: cublas_handles=2 there (docs/memory.md, "cuBLAS workspace").
AFTER_TRAINING = {"b4s512/infer-bf16", "b1s2048/infer-bf16", "b8s1024/infer-bf16"}
# Public cases outside 1% with no derived mechanism yet (held to 10% only; docs/memory.md, Validation).
OPEN_1PCT = {"infer-nf4"}


def _predict(kind: str, method: str | None, bits: int, gc: bool | None, b: int | None, s: int | None,
             name: str = "") -> int:
    if kind == "load":
        return estimate_weights(SPEC_1B, bits).peak_tensor_bytes
    if kind == "infer":
        assert b is not None and s is not None
        handles = 2 if name in AFTER_TRAINING else 1
        return estimate_serving(SPEC_1B, bits, batch_size=b, seq_len=s, cublas_handles=handles).peak_tensor_bytes
    assert method is not None and b is not None and s is not None and gc is not None
    return estimate_training(SPEC_1B, method, batch_size=b, seq_len=s, gradient_checkpointing=gc, recipe=HF_MEASURED,
                             lora_rank=16).peak_tensor_bytes


@pytest.mark.parametrize(
    "name,kind,method,bits,gc,b,s,measured",
    H100_CASES,
    ids=[f"h100-llama3.2-1b.json:{c[0]}:hf:tol10%" for c in H100_CASES],
)
def test_h100_measured_cases_within_10_percent(name, kind, method, bits, gc, b, s, measured):
    """Every public H100 case: predicted peak_tensor_bytes within 10% of max_memory_allocated."""
    pred = _predict(kind, method, bits, gc, b, s, name) / MiB
    assert abs(pred / measured - 1) <= 0.10, f"{name}: predicted {pred:.1f} MiB vs measured {measured} MiB"


@pytest.mark.parametrize(
    "name,kind,method,bits,gc,b,s,measured",
    [c for c in H100_CASES if c[0] not in OPEN_1PCT],
    ids=[f"h100-llama3.2-1b.json:{c[0]}:hf:tol1%" for c in H100_CASES if c[0] not in OPEN_1PCT],
)
def test_h100_cases_within_1_percent(name, kind, method, bits, gc, b, s, measured):
    """The per-tensor derivation is not just inside 10%: training, inference and loading land within 1%."""
    pred = _predict(kind, method, bits, gc, b, s, name) / MiB
    assert abs(pred / measured - 1) <= 0.01, f"{name}: predicted {pred:.1f} MiB vs measured {measured} MiB"


@pytest.mark.parametrize("name,method,b,s,measured", H100_UNSLOTH,
                         ids=[f"h100-llama3.2-1b.json:{c[0]}:unsloth:tol10%" for c in H100_UNSLOTH])
def test_h100_unsloth_cases_within_10_percent(name, method, b, s, measured):
    """Unsloth's loop (offloaded checkpoints, cut cross-entropy, fused kernels) predicted from its design."""
    e = estimate_training(SPEC_1B, method, batch_size=b, seq_len=s, recipe="unsloth", lora_rank=16)
    assert abs(e.peak_tensor_bytes / MiB / measured - 1) <= 0.10


def test_h100_trainable_parameter_count_matches_measured():
    """shared/memory/h100-llama3.2-1b.json 'trainable': 11,272,192 (LoRA r=16, 7 targets) and 1,235,814,400 (full)."""
    assert lora_params(SPEC_1B, 16, resolve_lora_targets(SPEC_1B, "all-linear")) == 11_272_192
    assert SPEC_1B.num_params == 1_235_814_400


def test_weights_after_load_exact():
    """h100 json 'alloc_after_load_MiB': bf16 2358.1 (weights alone 2357.1), nf4 980.1, int8 1430.6; tol 0.5%."""
    for bits, measured in ((16, 2358.1), (4, 980.1), (8, 1430.6)):
        e = estimate_weights(SPEC_1B, bits)
        loaded = e.phases["loaded"] / MiB
        assert abs(loaded / measured - 1) <= 0.005, (bits, loaded, measured)


def test_recipes_order_on_public_shape():
    """README of shared/memory: Unsloth < hf at b4s512 (2,884 vs 6,202 MiB); llmtune's chunked loss also < hf."""
    kw = dict(batch_size=4, seq_len=512, gradient_checkpointing=True)
    hf = estimate_training(SPEC_1B, "lora", recipe="hf", **kw).peak_tensor_bytes
    ours = estimate_training(SPEC_1B, "lora", recipe="llmtune", **kw).peak_tensor_bytes
    uns = estimate_training(SPEC_1B, "lora", recipe="unsloth", **kw).peak_tensor_bytes
    assert uns < ours < hf
    # hf QLoRA saves nothing here (fp32 upcast), llmtune QLoRA does
    assert estimate_training(SPEC_1B, "qlora", recipe="llmtune", **kw).peak_tensor_bytes < ours


# ------------------------------------------------------------------------------------------------ published points
def test_rule_of_thumb_lecture_168():
    """Lecture slide: M = (P x 4B / (32/Q)) x 1.2; 70e9 at 16 bits -> 168.0 GB (exact)."""
    assert rule_of_thumb_serving_gb(70e9, 16) == 168.0
    assert rule_of_thumb_serving_gb(70e9, 4) == 42.0


def test_kv_cache_opt13b_vllm_paper():
    """vLLM paper (arXiv 2309.06180): OPT-13B KV = 800 KB per token, 1.6 GB per 2048-token request; tol 0.1% / 5%."""
    opt = ModelSpec(name="opt-13b", family="generic", vocab_size=50272, hidden_size=5120, intermediate_size=20480,
                    num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128, mlp="plain", activation="gelu",
                    norm="layernorm")
    one = estimate_serving(opt, 16, batch_size=1, seq_len=1).breakdown["kv_cache"]
    assert one == 800 * 1024
    req = estimate_serving(opt, 16, batch_size=1, seq_len=2048).breakdown["kv_cache"]
    assert abs(req / 1.6e9 - 1) <= 0.05


def test_kv_cache_llama2_70b_gqa():
    """memory-estimation.md section 0/6.15: Llama-2-70B KV = 320 KiB per token (GQA 8 kv heads); exact."""
    e = estimate_serving(ModelSpec.from_preset("llama-2-70b"), 16, batch_size=1, seq_len=1)
    assert e.breakdown["kv_cache"] == 320 * 1024


def test_kv_cache_llama2_7b_gpu_poor():
    """gpu_poor README: llama-2-7b ~500 MB KV per 1000 tokens with exLlama/vLLM (512 KiB/token); tol 5%."""
    e = estimate_serving(ModelSpec.from_preset("llama-2-7b"), 16, batch_size=1, seq_len=1000)
    assert abs(e.breakdown["kv_cache"] / (500 * MiB) - 1) <= 0.05


def test_nf4_bits_per_param_qlora_paper():
    """QLoRA paper: NF4 with double quantization = 4.127 bits/param (4.5 without); tol 0.001 bit."""
    assert abs(quantized_bytes_per_param("nf4") * 8 - 4.127) < 1e-3
    assert abs(quantized_bytes_per_param("nf4", double_quant=False) * 8 - 4.5) < 1e-9


@pytest.mark.parametrize("sharding,published_gb", [("ddp", 120.0), ("zero1", 31.4), ("zero2", 16.6), ("zero3", 1.88)],
                         ids=lambda x: f"zero-paper-table1:{x}:tol1%" if isinstance(x, str) else str(x))
def test_zero_paper_table1_model_states(sharding, published_gb):
    """ZeRO paper Table 1: 7.5B model, DP 64, mixed-precision Adam: 120 / 31.4 / 16.6 / 1.88 GB per device."""
    spec = ModelSpec.from_params(7.5e9)
    e = estimate_training(spec, "full", precision="mixed", gpus=64, sharding=sharding, batch_size=1, seq_len=16)
    b = e.phase_breakdowns["optimizer_step"]
    states = sum(b.get(k, 0) for k in ("weights", "gradients", "optimizer_states", "master_weights_fp32"))
    per_param = states / spec.num_params
    assert abs(per_param * 7.5e9 / 1e9 / published_gb - 1) <= 0.01


def test_unsloth_readme_hf_fa2_marginal_memory_per_token():
    """Unsloth README max-context table: HF+FA2 column is linear at 2.36 MiB/token (Llama-3.1-8B QLoRA r=32,
    batch 1); our hf QLoRA slope must be within 10%."""
    spec = ModelSpec.from_preset("llama-3.1-8b")

    def peak(n: int) -> int:
        return estimate_training(spec, "qlora", batch_size=1, seq_len=n, lora_rank=32, recipe="hf",
                                 attention="flash").peak_tensor_bytes

    slope = (peak(20000) - peak(10000)) / 10000 / MiB
    assert abs(slope / 2.36 - 1) <= 0.10, slope


def test_gpt2_zero_paper_model_states_24gb():
    """ZeRO paper: GPT-2 1.5B needs at least 24 GB of model states with mixed-precision Adam (16 B/param); tol 5%."""
    e = estimate_training(ModelSpec.from_preset("gpt2-xl"), "full", precision="mixed", batch_size=1, seq_len=8)
    b = e.phase_breakdowns["optimizer_step"]
    states = sum(b.get(k, 0) for k in ("weights", "gradients", "optimizer_states", "master_weights_fp32"))
    assert abs(states / 24e9 - 1) <= 0.05


# ------------------------------------------------------------------------------------------------ ModelSpec
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_published(name):
    """Each preset's parameter count equals the published count (source in PRESETS[name].source)."""
    assert ModelSpec.from_preset(name).num_params == PRESETS[name].published_params


def test_at_least_25_presets_over_all_families():
    assert len(PRESETS) >= 25
    fams = {ModelSpec.from_preset(n).family for n in PRESETS}
    assert {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3", "phi3",
            "gpt2", "gpt_neox", "falcon"} <= fams


def test_from_hf_config_path_and_dir(tmp_path):
    cfg = dict(PRESETS["qwen2.5-0.5b"].config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = ModelSpec.from_hf_config(tmp_path)
    b = ModelSpec.from_hf_config(tmp_path / "config.json")
    c = ModelSpec.from_hf_config(cfg)
    assert a.num_params == b.num_params == c.num_params == 494_032_768
    assert a.tie_embeddings and a.qkv_bias and a.num_kv_heads == 2


def test_gemma3_multimodal_text_config_nesting():
    """Gemma 3 (4B+) configs nest the language model under text_config."""
    text = dict(PRESETS["gemma-3-1b"].config)
    nested = {"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 1152}}
    spec = ModelSpec.from_hf_config(nested)
    assert spec.family == "gemma3" and spec.num_params == ModelSpec.from_hf_config(text).num_params
    assert spec.head_dim == 256 and spec.qk_norm and spec.norms_per_layer == 4
    assert spec.sliding_layers == 26 - 26 // 6


def test_head_dim_gqa_moe_tied():
    q3 = ModelSpec.from_preset("qwen3-8b")
    assert q3.head_dim == 128 and q3.q_dim == 4096 and q3.kv_dim == 1024
    g = ModelSpec.from_preset("gemma-7b")
    assert g.head_dim == 256 and g.q_dim == 4096 != g.hidden_size  # head_dim is not hidden/heads
    mx = ModelSpec.from_preset("mixtral-8x7b")
    assert mx.is_moe and 12.5e9 < mx.active_params < 13.5e9  # ~12.9B active of 46.7B
    assert ModelSpec.from_preset("llama-3.2-1b").tie_embeddings
    assert not ModelSpec.from_preset("llama-3.1-8b").tie_embeddings


def test_from_params_is_close_and_marked_approximate():
    spec = ModelSpec.from_params(7e9)
    assert spec.approximate and abs(spec.num_params / 7e9 - 1) < 0.1


@pytest.mark.parametrize("bad,field", [
    ({"hidden_size": -5}, "hidden_size"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"vocab_size": "big"}, "vocab_size"),
    ({"num_key_value_heads": -1}, "num_key_value_heads"),
])
def test_bad_config_values_name_the_field(bad, field):
    cfg = {**PRESETS["llama-3.2-1b"].config, **bad}
    with pytest.raises(ConfigError, match=field):
        ModelSpec.from_hf_config(cfg)


@pytest.mark.parametrize("missing", ["hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"])
def test_missing_config_field_is_named(missing):
    cfg = {k: v for k, v in PRESETS["llama-3.2-1b"].config.items() if k != missing}
    with pytest.raises(ConfigError, match=f"missing field '{missing}'"):
        ModelSpec.from_hf_config(cfg)


def test_unknown_model_type_and_preset_and_family():
    with pytest.raises(ConfigError, match=r"model_type 'lama'.*Did you mean 'llama'"):
        ModelSpec.from_hf_config({**PRESETS["llama-3.2-1b"].config, "model_type": "lama"})
    with pytest.raises(ConfigError, match="missing field 'model_type'"):
        ModelSpec.from_hf_config({"hidden_size": 8})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelSpec.from_preset("llama-9")
    with pytest.raises(ConfigError, match="family"):
        ModelSpec(name="x", family="bert", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                  num_heads=1, num_kv_heads=1, head_dim=8)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelSpec.from_hf_config("/nonexistent/dir")


@pytest.mark.parametrize("kwargs,field", [
    ({"batch_size": -1}, "batch_size"),
    ({"seq_len": 0}, "seq_len"),
    ({"method": "prefix"}, "method"),
    ({"recipe": "axolotl"}, "recipe"),
    ({"optimizer": "lion"}, "optimizer"),
    ({"attention": "xformers"}, "attention"),
    ({"sharding": "zero4"}, "sharding"),
    ({"lora_rank": 0}, "lora_rank"),
    ({"lora_targets": ["c_attn"]}, "lora_targets"),
    ({"loss_chunk_tokens": 0}, "loss_chunk_tokens"),
    ({"gpus": 0}, "gpus"),
])
def test_bad_estimate_arguments_name_the_argument(kwargs, field):
    with pytest.raises(InvalidOptionError, match=field):
        estimate_training(SPEC_1B, **kwargs)


def test_bad_serving_arguments():
    with pytest.raises(InvalidOptionError, match="kv_bits"):
        estimate_serving(SPEC_1B, 16, kv_bits=3)
    with pytest.raises(InvalidOptionError, match="weight_bits"):
        estimate_serving(SPEC_1B, 5)
    with pytest.raises(InvalidOptionError, match="batch_size"):
        estimate_serving(SPEC_1B, 16, batch_size=0)


# ------------------------------------------------------------------------------------------------ structure
def test_peak_is_max_over_phases_and_breakdown_adds_up():
    e = estimate_training(SPEC_1B, "full", batch_size=4, seq_len=512, recipe="hf")
    assert e.peak_tensor_bytes == max(e.phases.values()) < sum(e.phases.values())
    assert e.peak_tensor_bytes == e.phases[e.peak_phase]
    assert sum(e.breakdown.values()) == e.device_bytes
    assert e.device_bytes == e.peak_tensor_bytes + e.breakdown["cuda_context"] + e.breakdown["allocator_reserve"]
    assert {"forward", "loss_backward", "optimizer_step"} <= set(e.phases)
    assert e.peak_phase == "optimizer_step"  # small batch: AdamW's transient wins (HF memory blog)
    big = estimate_training(SPEC_1B, "full", batch_size=8, seq_len=1024, recipe="hf")
    assert big.peak_phase == "loss_backward"  # large batch: the activations/logits win


def test_breakdown_names_every_term():
    e = estimate_training(SPEC_1B, "qlora", batch_size=2, seq_len=256, gradient_checkpointing=False, recipe="hf")
    for term in ("weights_nf4", "quant_metadata_nf4", "embeddings_lm_head", "lora_params", "optimizer_states",
                 "activations_lora_inputs", "logits", "loss_log_softmax", "cuda_context", "allocator_reserve"):
        assert term in e.breakdown, term


def test_checkpointing_eager_and_flash():
    kw = dict(batch_size=1, seq_len=4096, recipe="llmtune")
    no_gc = estimate_training(SPEC_1B, "lora", gradient_checkpointing=False, **kw)
    gc = estimate_training(SPEC_1B, "lora", gradient_checkpointing=True, **kw)
    eager = estimate_training(SPEC_1B, "lora", gradient_checkpointing=False, attention="eager", **kw)
    assert gc.peak_tensor_bytes < no_gc.peak_tensor_bytes < eager.peak_tensor_bytes
    # eager's attention matrix grows with s^2: doubling s more than doubles it
    e2 = estimate_training(SPEC_1B, "lora", gradient_checkpointing=False, attention="eager", batch_size=1,
                           seq_len=8192, recipe="llmtune")
    scores = eager.breakdown["activations_attention_scores"]
    assert e2.breakdown["activations_attention_scores"] == 4 * scores


def test_optimizers_and_sharding():
    spec = ModelSpec.from_preset("llama-3.1-8b")
    kw = dict(batch_size=1, seq_len=512)
    adam = estimate_training(spec, "full", **kw).breakdown["optimizer_states"]
    assert adam == 4 * spec.num_params  # bf16 params: torch AdamW keeps bf16 states
    a8 = estimate_training(spec, "full", optimizer="adamw_8bit", **kw).breakdown["optimizer_states"]
    assert 2 * spec.num_params <= a8 < 2.1 * spec.num_params
    assert "optimizer_states" not in estimate_training(spec, "full", optimizer="sgd", **kw).breakdown
    one = estimate_training(spec, "full", **kw).peak_tensor_bytes
    fsdp = estimate_training(spec, "full", gpus=8, sharding="fsdp", **kw)
    assert fsdp.peak_tensor_bytes < one / 3 and "gathered_layers" in fsdp.breakdown
    ddp = estimate_training(spec, "lora", gpus=8, sharding="ddp", **kw)
    assert "ddp_grad_buckets" in ddp.breakdown


def test_serving_terms_quant_and_sliding_window():
    spec = ModelSpec.from_preset("llama-3.1-8b")
    for bits, term in ((4, "quant_metadata_nf4"), (8, "quant_metadata_int8")):
        assert term in estimate_serving(spec, bits).breakdown
    gptq = estimate_serving(spec, 4, weight_format="gptq").breakdown
    assert gptq["quant_metadata_gptq"] > 0
    g2 = ModelSpec.from_preset("gemma-2-2b")
    short = estimate_serving(g2, 16, seq_len=4096).breakdown["kv_cache"]
    long = estimate_serving(g2, 16, seq_len=8192)
    # transformers' sliding-window cache layers keep a view of the full prefill: no saving in one forward
    assert long.breakdown["kv_cache"] == 2 * short and any("sliding" in n for n in long.assumptions)
    # training past the window: sliding layers get an explicit mask and repeated K/V
    kw = dict(gradient_checkpointing=False, recipe="hf")
    inside = estimate_training(g2, "lora", seq_len=4096, batch_size=2, **kw)  # same tokens, within the window
    past = estimate_training(g2, "lora", seq_len=8192, batch_size=1, **kw)
    assert past.breakdown["activations_attention"] > inside.breakdown["activations_attention"]  # 4 kv -> 8 heads
    assert past.breakdown["activations_attention_scores"] > 0 and "activations_attention_scores" not in inside.breakdown
    g3 = ModelSpec.from_preset("gemma-3-1b")  # a single kv head: repeat_kv is a view, no extra K/V
    inside = estimate_training(g3, "lora", seq_len=512, batch_size=4, **kw)
    past = estimate_training(g3, "lora", seq_len=2048, batch_size=1, **kw)
    assert past.breakdown["activations_attention"] == inside.breakdown["activations_attention"]


def test_solvers_find_the_boundary():
    spec = ModelSpec.from_preset("llama-3.1-8b")
    n = max_batch_size(spec, "A100-40GB", seq_len=2048, method="qlora", recipe="llmtune")
    assert n >= 1
    assert estimate_training(spec, "qlora", batch_size=n, seq_len=2048, recipe="llmtune").fits("A100-40GB")
    assert not estimate_training(spec, "qlora", batch_size=n + 1, seq_len=2048, recipe="llmtune").fits("A100-40GB")
    s = max_seq_len(spec, "H100", method="lora", recipe="hf")
    assert estimate_training(spec, "lora", seq_len=s, recipe="hf").device_bytes <= GPUS["H100-80GB"]
    assert estimate_training(spec, "lora", seq_len=s + 1, recipe="hf").device_bytes > GPUS["H100-80GB"]
    assert max_batch_size(ModelSpec.from_preset("llama-3.1-405b"), "T4", seq_len=512, method="full") == 0
    with pytest.raises(InvalidOptionError, match="batch_size"):
        max_batch_size(spec, "T4", seq_len=8, batch_size=2)
    with pytest.raises(InvalidOptionError, match="unknown GPU"):
        max_seq_len(spec, "V100")


def test_every_preset_every_method_runs():
    for name in PRESETS:
        spec = ModelSpec.from_preset(name)
        for method in ("full", "lora", "qlora", "dora"):
            for recipe in ("hf", "llmtune", "unsloth"):
                e = estimate_training(spec, method, batch_size=1, seq_len=128, recipe=recipe)
                assert e.peak_tensor_bytes > 0 and all(v >= 0 for v in e.breakdown.values())
        assert estimate_serving(spec, 4).peak_tensor_bytes > 0


def test_memory_package_never_imports_torch():
    code = ("import sys, llmtune.memory as m; m.estimate_training(m.ModelSpec.from_preset('gpt2'));"
            "bad=[k for k in sys.modules if k.split('.')[0] in ('torch','transformers','numpy')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_recipes_are_data_no_branches():
    """Every recipe difference is a field of RECIPE_FACTS: the estimator names no recipe, and module names
    come only from ModelSpec.layer_linears() (no hard-coded projection names in the recipe table)."""
    import dataclasses
    import inspect

    from llmtune.memory import estimate, recipes

    src = inspect.getsource(estimate)
    for name in recipes.RECIPE_FACTS:
        assert f'recipe == "{name}"' not in src and f'recipe != "{name}"' not in src
    assert "_proj" not in inspect.getsource(recipes)
    # a variant is a replace(), and it changes the estimate exactly through its facts
    upcast = dataclasses.replace(recipes.RECIPE_FACTS["llmtune"], name="llmtune+upcast", kbit_upcast_fp32=True)
    kw = dict(batch_size=2, seq_len=256)
    a = estimate_training(SPEC_1B, "qlora", recipe="llmtune", **kw).breakdown
    b = estimate_training(SPEC_1B, "qlora", recipe=upcast, **kw).breakdown
    assert b["embeddings_lm_head"] == 2 * a["embeddings_lm_head"]
    with pytest.raises(InvalidOptionError, match="loss"):
        dataclasses.replace(upcast, loss="fused")


def test_objectives_dpo_reward_online_rl():
    """DPO = the SFT step on 2x the sequences + a no-grad reference pass; adapter-off reference holds no second
    copy, a copied reference (or full fine-tuning) holds one; reward = no logits, a scalar head; online RL =
    K samples' generation KV cache + training on K x the sequences."""
    kw = dict(seq_len=512, recipe="hf", gradient_checkpointing=True)
    sft2 = estimate_training(SPEC_1B, "lora", batch_size=4, **kw)
    dpo = estimate_training(SPEC_1B, "lora", batch_size=2, objective="dpo", **kw)
    pairs = 2 * (PAIR_BATCH_BYTES + PAIR_LOSS_BYTES["dpo"])  # one pair per example
    assert dpo.phases["loss_backward"] == sft2.phases["loss_backward"] + pairs
    assert "reference_forward" in dpo.phases and "reference_weights" not in dpo.breakdown
    copy = estimate_training(SPEC_1B, "lora", batch_size=2, objective="dpo", dpo_reference="copy", **kw)
    assert copy.breakdown["reference_weights"] == sft2.breakdown["weights"]
    full = estimate_training(SPEC_1B, "full", batch_size=2, objective="dpo", **kw)
    assert "reference_weights" in full.phase_breakdowns["optimizer_step"]
    rm = estimate_training(SPEC_1B, "lora", batch_size=2, objective="reward", **kw)
    assert "loss_log_softmax" not in rm.phase_breakdowns["loss_backward"]
    assert rm.peak_tensor_bytes < dpo.peak_tensor_bytes
    rl = estimate_training(SPEC_1B, "lora", batch_size=1, objective="online_rl", rl_samples=8, **kw)
    g = rl.phase_breakdowns["generation"]["generation_kv_cache"]
    assert g == 2 * 16 * 512 * 2 * 8 * 512  # 2 (K,V) x layers x kv_dim x bf16 x 8 samples x 512 tokens
    assert rl.phases["loss_backward"] == estimate_training(SPEC_1B, "lora", batch_size=8, **kw).phases["loss_backward"]
    with pytest.raises(InvalidOptionError, match="objective"):
        estimate_training(SPEC_1B, objective="ppo")
    with pytest.raises(InvalidOptionError, match="rl_samples"):
        estimate_training(SPEC_1B, objective="online_rl", rl_samples=0)


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_a_ranking_of_k_answers_is_k_rows_and_its_pairs(objective):
    """A ranking of K answers puts K rows through the model (each answer once) and K(K-1)/2 pairs into the loss:
    the step is the one of K pairs' worth of rows, plus the pairs' bytes (K=2000: ~2M pairs)."""
    kw = dict(seq_len=256, recipe="llmtune", gradient_checkpointing=True)
    for k in (2, 8, 2000):
        ranked = estimate_training(SPEC_1B, "lora", batch_size=1, objective=objective, responses=k, **kw)
        rows = estimate_training(SPEC_1B, "lora", batch_size=k // 2, objective=objective, **kw)  # pairs: 2 rows each
        extra = k * (k - 1) // 2 - k // 2  # the ranking's pairs beyond the k/2 pairs of `rows`
        assert ranked.breakdown["pair_indices"] == PAIR_BATCH_BYTES * k * (k - 1) // 2
        loss = "loss_backward" if objective == "dpo" else "loss_forward"
        assert ranked.phases[loss] - rows.phases[loss] == extra * (PAIR_BATCH_BYTES + PAIR_LOSS_BYTES[objective])
    pair = estimate_training(SPEC_1B, "lora", batch_size=1, objective=objective, **kw)
    assert ranked.peak_tensor_bytes > 40 * pair.peak_tensor_bytes  # 167.6 GB vs 3.6 GB (1B model, 256 tokens)
    with pytest.raises(InvalidOptionError, match="responses must be an integer >= 2"):
        estimate_training(SPEC_1B, objective=objective, responses=1)


def test_adapter_method_parameter_counts():
    """Bottleneck: 2hm + m + h per adapter; IA3: 2 kv + f per layer; prompt tuning: n x h; all fp32 (4 B)."""
    h, kv, f, L = 2048, 512, 8192, 16
    kw = dict(batch_size=1, seq_len=128)
    bn = estimate_training(SPEC_1B, "bottleneck", bottleneck_size=64, **kw).breakdown["lora_params"]
    assert bn == 4 * L * 2 * (2 * h * 64 + 64 + h)
    assert estimate_training(SPEC_1B, "ia3", **kw).breakdown["lora_params"] == 4 * L * (2 * kv + f)
    assert estimate_training(SPEC_1B, "prompt_tuning", num_virtual_tokens=20, **kw).breakdown["lora_params"] == 4 * 20 * h
    pt = estimate_training(SPEC_1B, "prefix_tuning", num_virtual_tokens=20, **kw)
    assert pt.breakdown["lora_params"] == 4 * 20 * L * 2 * kv
    for name in ("gemma-3-1b", "qwen3-30b-a3b", "gpt2", "falcon-7b"):  # every adapter method on odd families
        spec = ModelSpec.from_preset(name)
        for method in ("prompt_tuning", "prefix_tuning", "ia3", "bottleneck"):
            for gc in (True, False):
                e = estimate_training(spec, method, gradient_checkpointing=gc, recipe="hf", **kw)
                assert e.peak_tensor_bytes > 0 and all(v >= 0 for v in e.breakdown.values())
