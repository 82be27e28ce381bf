"""Replay the ``hf`` QLoRA recipe on CPU and compare its live tensors with ``estimate_training`` (no GPU).

The recipe is the one ``shared/memory/reference_recipe.py`` measures: a bitsandbytes nf4 model (double
quantization, bf16 compute), ``prepare_model_for_kbit_training`` (fp32 upcast, reentrant checkpointing),
PEFT LoRA on every linear, AdamW, ``out = model(ids, labels=ids); out.loss.backward()``. SDPA is forced to
the kernel CUDA would pick (math for fp32 with grouped heads). A ``TorchDispatchMode`` tracks every storage
an ATen op returns; weights, adapters and GPU-only terms (cuBLAS workspace, dequantization buffer) are left
out of both sides. One JSON line per run. The defaults are TinyLlama's width with 2 layers:

    python benchmarks/memory_kbit_replay.py --layers 2 --batch 1 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from typing import Any

from llmtune.memory import ModelSpec, estimate_training
from llmtune.memory.attention import cuda_attention_kernel

MiB = 2**20
NOT_IN_STEP = {"weights_nf4", "quant_metadata_nf4", "embeddings_lm_head", "norms", "lora_params",
               "cublas_workspace", "dequant_buffer"}


def replay(cfg: dict[str, Any], batch: int, seq: int, steps: int, rank: int) -> dict[str, Any]:
    """Live-tensor peak of ``steps`` steps of the recipe, and the estimate's phases without static terms."""
    import peft
    import torch
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmtune.models.live_memory import LivePeak

    spec = ModelSpec.from_hf_config(cfg)
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
        transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, quantization_config=q,
                                                                  device_map={"": "cpu"}, attn_implementation="sdpa")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                    target_modules=spec.linear_module_names()))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(4, spec.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    kernel = cuda_attention_kernel(spec, 4, "sdpa")
    backend = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION}.get(kernel, SDPBackend.MATH)
    meter = LivePeak.excluding(pm)
    with sdpa_kernel(backend), warnings.catch_warnings(), meter:
        warnings.simplefilter("ignore")
        for _ in range(steps):
            out = pm(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    e = estimate_training(spec, "qlora", batch_size=batch, seq_len=seq, recipe="hf", gradient_checkpointing=True,
                          lora_rank=rank)
    phases = {p: sum(v for k, v in t.items() if k not in NOT_IN_STEP) for p, t in e.phase_breakdowns.items()}
    top = max(phases, key=lambda p: phases[p])
    return {"layers": spec.num_layers, "batch": batch, "seq": seq, "steps": steps, "kernel": kernel,
            "transformers": transformers.__version__, "live_peak_MiB": round(meter.peak / MiB, 2),
            "predicted_MiB": round(phases[top] / MiB, 2), "predicted_phase": top,
            "error_pct": round(100 * (phases[top] / meter.peak - 1), 2)}


def main() -> None:
    """Parse the shape and print one JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    a = ap.parse_args()
    cfg = dict(model_type="llama", vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
               num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
               tie_word_embeddings=False)
    print(json.dumps(replay(cfg, a.batch, a.seq, a.steps, a.rank)))


if __name__ == "__main__":
    main()
