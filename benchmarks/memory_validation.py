"""Predicted vs measured peak GPU memory: llmtune.memory against the plain transformers + PEFT recipe.

On a CUDA machine this runs the reference recipe of ``shared/memory/reference_recipe.py`` (its logic is
copied here: random-init models from configs, bf16 LoRA/QLoRA/full AdamW for 4 steps, one inference
forward) over a grid of architectures x methods x batch/sequence shapes, and prints one JSON line per case
with ``measured_MiB`` (``torch.cuda.max_memory_allocated``), ``predicted_MiB`` (recipe="hf") and the error.
Without CUDA it prints one JSON line saying it was skipped and why; ``--predict-only`` prints predictions.

    python benchmarks/memory_validation.py --archs llama-3.2-1b,qwen2.5-0.5b --grid 4x512,1x2048
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from llmtune.memory import PRESETS, ModelSpec, estimate_serving, estimate_training, estimate_weights

MiB = 2**20
CASES = ("lora-bf16-gc", "qlora-nf4-gc", "lora-bf16", "full-bf16-adamw-gc", "infer-bf16", "infer-nf4")
DEFAULT_ARCHS = "llama-3.2-1b,qwen2.5-0.5b,gemma-3-1b,smollm2-135m,phi-3-mini"
#: The reference recipe's LoRA targets; PEFT wraps those an architecture has (Phi-3: o_proj, down_proj).
TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _case_args(case: str) -> dict[str, Any]:
    """(method, bits, gc) of a case name."""
    if case.startswith("infer"):
        return {"method": "infer", "bits": 4 if "nf4" in case else 16, "gc": None}
    method = case.split("-")[0]
    return {"method": method, "bits": 4 if method == "qlora" else 16, "gc": case.endswith("-gc")}


def predict(spec: ModelSpec, case: str, batch: int, seq: int, rank: int) -> int:
    """llmtune.memory's peak_tensor_bytes for one case of the reference recipe."""
    a = _case_args(case)
    if a["method"] == "infer":
        return estimate_serving(spec, a["bits"], batch_size=batch, seq_len=seq).peak_tensor_bytes
    targets: list[str] | str = [t for t in TARGETS if t in spec.linear_module_names()] or "all-linear"
    return estimate_training(spec, a["method"], batch_size=batch, seq_len=seq, gradient_checkpointing=a["gc"],
                             recipe="hf", lora_rank=rank, lora_targets=targets).peak_tensor_bytes


def _measure(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` between a peak reset and a max_memory_allocated read (as the reference recipe does)."""
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out: dict[str, Any] = {}
    t = time.time()
    try:
        out.update(fn() or {})
    except Exception as exc:  # an OOM or a library error is a result, not a crash of the whole grid
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out["wall_s"] = round(time.time() - t, 2)
    out["measured_MiB"] = round(torch.cuda.max_memory_allocated() / MiB, 1)
    out["reserved_MiB"] = round(torch.cuda.max_memory_reserved() / MiB, 1)
    gc.collect()
    torch.cuda.empty_cache()
    return out


def _write_model(name: str, root: str) -> str:
    """Save a random-init bf16 model of preset ``name`` (config only; no download) and return its dir."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(PRESETS[name].config)
    model_type = cfg.pop("model_type")
    if model_type == "phi3":
        cfg.setdefault("pad_token_id", 0)
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path = os.path.join(root, name)
    model.save_pretrained(path)
    del model
    return path


def _run_case(path: str, vocab: int, case: str, batch: int, seq: int, rank: int, targets: list[str]) -> dict[str, Any]:
    """The reference recipe for one case (load, optional PEFT, 4 AdamW steps or one inference forward)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    a = _case_args(case)

    def load(q: str | None) -> Any:
        kw: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": 0}}
        if q == "nf4":
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(path, **kw)

    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).cuda()

    def infer() -> dict[str, Any]:
        m = load("nf4" if a["bits"] == 4 else None)
        m.eval()
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=True)
        del out, m
        return {}

    def train() -> dict[str, Any]:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if a["method"] == "full":
            m = load(None)
            if a["gc"]:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            m = load("nf4" if a["method"] == "qlora" else None)
            if a["method"] == "qlora":
                m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=a["gc"])
            elif a["gc"]:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                m.enable_input_require_grads()
            m = get_peft_model(m, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(4):
            out = m(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        n = sum(p.numel() for p in params)
        del out, opt, params, m
        return {"trainable": n}

    return _measure(infer if a["method"] == "infer" else train)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the grid, print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=DEFAULT_ARCHS, help="comma-separated preset names")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    ap.add_argument("--grid", default="4x512,1x2048,8x1024", help="batch x seq shapes, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new cases after this many seconds")
    ap.add_argument("--predict-only", action="store_true", help="print predictions without measuring")
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    cases = [c for c in args.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; choose from {CASES}")
    grid = [tuple(int(x) for x in g.split("x")) for g in args.grid.split(",") if g]
    specs = {a: ModelSpec.from_preset(a) for a in archs}

    cuda_reason = None
    if not args.predict_only:
        try:
            import torch

            if not torch.cuda.is_available():
                cuda_reason = "torch.cuda.is_available() is False"
        except ImportError:
            cuda_reason = "torch is not installed"
    if cuda_reason or args.predict_only:
        if cuda_reason:
            print(json.dumps({"benchmark": "memory_validation", "skipped": True, "reason": cuda_reason,
                              "hint": "run on a CUDA machine; --predict-only prints the predictions"}), flush=True)
        if args.predict_only:
            for a, spec in specs.items():
                w = estimate_weights(spec, 16).peak_tensor_bytes / MiB
                for b, s in grid:
                    for c in cases:
                        print(json.dumps({"arch": a, "case": c, "batch": b, "seq": s, "weights_MiB": round(w, 1),
                                          "predicted_MiB": round(predict(spec, c, b, s, args.rank) / MiB, 1)}),
                              flush=True)
        return 0

    import torch

    t0 = time.time()
    print(json.dumps({"benchmark": "memory_validation", "gpu": torch.cuda.get_device_name(0),
                      "torch": torch.__version__}), flush=True)
    with tempfile.TemporaryDirectory() as root:
        for a, spec in specs.items():
            path = _write_model(a, root)
            targets: list[str] = [t for t in TARGETS if t in spec.linear_module_names()]
            for b, s in grid:
                for c in cases:
                    row: dict[str, Any] = {"arch": a, "case": c, "batch": b, "seq": s}
                    if time.time() - t0 > args.budget_s:
                        row["skipped"] = "budget"
                        print(json.dumps(row), flush=True)
                        continue
                    pred = predict(spec, c, b, s, args.rank) / MiB
                    row.update(_run_case(path, spec.vocab_size, c, b, s, args.rank, targets))
                    row["predicted_MiB"] = round(pred, 1)
                    if "error" not in row:
                        row["err_pct"] = round(100 * (pred / row["measured_MiB"] - 1), 2)
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
