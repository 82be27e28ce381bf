"""Check llmtune.memory's per-tensor activation terms against what autograd really saves (CPU, tiny models).

For each family a tiny bf16 model is built from a config with transformers; one forward with labels runs
under ``torch.autograd.graph.saved_tensors_hooks`` and the distinct storages saved for backward (parameters
excluded) are summed. That sum must match the memory model's activation + loss terms for that shape. Also
checks parameter counts against the real modules built on the meta device.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from llmtune.memory import PRESETS, ModelSpec, estimate_training  # noqa: E402

pytestmark = pytest.mark.cpu_kernels  # rerun under forced kernel paths: tests/cpu_paths.py

B, S = 2, 64
TINY = {
    "llama": dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", vocab_size=1000, hidden_size=224, intermediate_size=608, num_hidden_layers=2,
                  num_attention_heads=7, num_key_value_heads=1),
    "qwen3": dict(model_type="qwen3", vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "gemma2": dict(model_type="gemma2", vocab_size=1000, hidden_size=256, intermediate_size=1024,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256),
    "gemma3": dict(model_type="gemma3_text", vocab_size=1000, hidden_size=256, intermediate_size=1024,
                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=256, sliding_window=32),
    # sliding window 32 < seq 64: explicit mask, so K/V are repeated to all 4 heads (2 kv heads)
    "gemma3-gqa": dict(model_type="gemma3_text", vocab_size=1000, hidden_size=256, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       sliding_window=32),
    "phi3": dict(model_type="phi3", pad_token_id=0, vocab_size=1000, hidden_size=256, intermediate_size=688,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=1000, hidden_size=256, intermediate_size=1024,
                     num_hidden_layers=2, num_attention_heads=8),
}
# (family, method, attention): all families with SDPA; eager and full fine-tuning on a subset
CASES = [(f, "lora", "sdpa") for f in TINY if f != "qwen2"] + [
    ("llama", "full", "sdpa"), ("gemma3", "full", "sdpa"), ("llama", "lora", "eager"),]


def _build(cfg: dict, attention: str):
    cfg = dict(cfg)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)
        except ValueError as exc:  # e.g. transformers >= 5.2x runs Gemma 2 only with eager attention
            if "does not support an attention implementation" not in str(exc):
                raise
            pytest.skip(f"transformers {transformers.__version__} cannot run {model_type} with {attention}: {exc}")
        return model.to(torch.bfloat16)


def _saved_bytes(model) -> int:
    """Bytes of distinct non-parameter storages autograd saves during one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.is_floating_point():
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(3, 1000, (B, S), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("family,method,attention", CASES, ids=[f"{f}-{m}-{a}:tol1%" for f, m, a in CASES])
def test_activation_terms_match_autograd(family, method, attention):
    """Saved activations + loss (log-softmax) of one forward: predicted within 1% of autograd's saved tensors."""
    spec = ModelSpec.from_hf_config(TINY[family])
    model = _build(TINY[family], attention)
    if method == "lora":
        targets = spec.linear_module_names()
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    model.train()
    measured = _saved_bytes(model)
    e = estimate_training(spec, method, batch_size=B, seq_len=S, gradient_checkpointing=False, recipe="hf",
                          lora_rank=8, attention=attention)
    b = e.phase_breakdowns["loss_forward"]
    predicted = sum(v for k, v in b.items() if k.startswith("activations_")) + b["loss_log_softmax"]
    predicted += b.get("logits_softcap", 0)  # Gemma 2: tanh output saved for the final soft-capping
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"


SAMPLE = ["qwen2.5-0.5b", "qwen3-30b-a3b", "gemma-3-1b", "phi-3-mini", "gpt2", "falcon-7b"]


@pytest.mark.parametrize("name", SAMPLE)
def test_parameter_count_matches_transformers_meta_model(name):
    """ModelSpec.num_params equals the parameters of the real transformers module (built on 'meta')."""
    cfg = dict(PRESETS[name].config)
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == ModelSpec.from_preset(name).num_params


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_math_kernel_terms_match_autograd_fp32_gqa(family):
    """The ``hf`` QLoRA recipe's fp32 activations with GQA run CUDA's math SDPA kernel (flash takes 16-bit
    only, memory-efficient no grouped heads): scaled q, scaled and repeated k, repeated v (fp32) and the
    fp32 [b, heads, s, s] softmax output are saved. The CPU picks its flash kernel for fp32, so the math
    kernel is forced here. An fp32 model with fp32 LoRA stands for the recipe (bitsandbytes casts the 4-bit
    matmul's output back to the fp32 input dtype). Predicted within 1% of autograd's saved tensors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmtune.memory.attention import cuda_attention_kernel

    spec = ModelSpec.from_hf_config(TINY[family])
    assert cuda_attention_kernel(spec, 4, "sdpa") == "math"
    model = _build(TINY[family], "sdpa").float()
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                       target_modules=spec.linear_module_names()))
    model.train()
    with sdpa_kernel(SDPBackend.MATH):
        measured = _saved_bytes(model)
    e = estimate_training(spec, "qlora", batch_size=B, seq_len=S, gradient_checkpointing=False, recipe="hf",
                          lora_rank=8)
    b = e.phase_breakdowns["loss_forward"]
    predicted = sum(v for k, v in b.items() if k.startswith("activations_")) + b["loss_log_softmax"]
    assert b["activations_attention_scores"] == spec.num_layers * 4 * spec.num_heads * S * S * B
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"


def _predicted_saved(spec, **kw) -> int:
    e = estimate_training(spec, batch_size=B, seq_len=S, gradient_checkpointing=False, recipe="hf", **kw)
    b = e.phase_breakdowns["loss_forward"]
    return sum(v for k, v in b.items() if k.startswith("activations_")) + b["loss_log_softmax"]


def test_prompt_tuning_terms_match_autograd():
    """PEFT prompt tuning, 8 virtual tokens: every layer runs s + 8 positions, layer 0's norm saves (the input
    needs a gradient), no adapter tensors; trainable 8 x h. Within 1% of autograd's saved tensors."""
    spec = ModelSpec.from_hf_config(TINY["llama"])
    model = peft.get_peft_model(_build(TINY["llama"], "sdpa"),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    model.train()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * spec.hidden_size
    measured = _saved_bytes(model)
    predicted = _predicted_saved(spec, method="prompt_tuning", num_virtual_tokens=8)
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"


def test_ia3_terms_match_autograd():
    """PEFT IA3 with its Llama defaults (k_proj, v_proj output scaling; down_proj input scaling): saves the
    scaled k/v outputs (a x 2 kv) and the fp32 copy of down_proj's input PEFT makes (4 f) per token
    and layer; parameters L x (2 kv + f). Within 1%."""
    from llmtune.memory.mechanisms import adapter_params

    spec = ModelSpec.from_hf_config(TINY["llama"])
    model = peft.get_peft_model(_build(TINY["llama"], "sdpa"), peft.IA3Config(task_type="CAUSAL_LM"))
    model.train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == adapter_params(spec, "ia3", num_virtual_tokens=1, bottleneck_size=1, sites=("mlp",))
    measured = _saved_bytes(model)
    predicted = _predicted_saved(spec, method="ia3")
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"


class _Bottleneck(torch.nn.Module):
    """A series bottleneck adapter (Houlsby et al.) in fp32 after a bf16 sublayer: x + up(silu(down(x)))."""

    def __init__(self, inner, width: int, m: int, parallel_input: bool = False):
        super().__init__()
        self.inner, self.down, self.up = inner, torch.nn.Linear(width, m), torch.nn.Linear(m, width)

    def forward(self, x):
        y = self.inner(x)
        return y + self.up(torch.nn.functional.silu(self.down(y.float()))).to(y.dtype)


@pytest.mark.parametrize("sites", [("attention", "mlp"), ("mlp",)])
def test_bottleneck_adapter_terms_match_autograd(sites):
    """Series bottleneck adapters (m = 16) after attention and/or the MLP, fp32 weights on a bf16 model:
    2hm + m + h parameters each; each saves its fp32 input copy, the down output and the activation output
    (4 x (h + 2m) per token). Within 1% of autograd's saved tensors."""
    spec = ModelSpec.from_hf_config(TINY["llama"])
    model = _build(TINY["llama"], "sdpa")
    for p in model.parameters():
        p.requires_grad_(False)
    h, m = spec.hidden_size, 16
    for layer in model.model.layers:
        if "attention" in sites:
            layer.self_attn.o_proj = _Bottleneck(layer.self_attn.o_proj, h, m)
        if "mlp" in sites:
            layer.mlp.down_proj = _Bottleneck(layer.mlp.down_proj, h, m)
    model.train()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == spec.num_layers * len(sites) * (2 * h * m + m + h)
    measured = _saved_bytes(model)
    predicted = _predicted_saved(spec, method="bottleneck", bottleneck_size=m, bottleneck_sites=sites)
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"


def test_packing_with_sdpa_matches_autograd():
    """Two packed sequences per row (position_ids restart, no attention mask, use_cache=False as in training):
    transformers' masking_utils detects the packing and gives SDPA a block-diagonal mask, so K/V are repeated
    to every head and the mask's float bias is saved per layer. (With a cache object it skips the detection
    and the sequences attend across the boundary.) Within 1%."""
    spec = ModelSpec.from_hf_config(TINY["llama"])
    model = peft.get_peft_model(_build(TINY["llama"], "sdpa"),
                                peft.LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=spec.linear_module_names()))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.is_floating_point() and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 1000, (B, S), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(S // 2), torch.arange(S // 2)]).expand(B, S)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)
    predicted = _predicted_saved(spec, method="lora", lora_rank=8, packing=True)
    assert predicted > _predicted_saved(spec, method="lora", lora_rank=8)
    assert abs(predicted / sum(seen.values()) - 1) <= 0.01, f"predicted {predicted} vs autograd {sum(seen.values())}"


def test_prefix_tuning_terms_match_autograd():
    """PEFT prefix tuning, 8 virtual tokens: n x L x 2 x kv_dim parameters; K/V of s + 8 positions repeated to
    every head (PEFT passes a mask) and a float bias over s + 8 keys per layer. Within 1% of autograd."""
    spec = ModelSpec.from_hf_config(TINY["llama"])
    model = peft.get_peft_model(_build(TINY["llama"], "sdpa"),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    model.train()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * spec.num_layers * 2 * spec.kv_dim
    measured = _saved_bytes(model)
    predicted = _predicted_saved(spec, method="prefix_tuning", num_virtual_tokens=8)
    assert abs(predicted / measured - 1) <= 0.01, f"predicted {predicted} vs autograd {measured}"
