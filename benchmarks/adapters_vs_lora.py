"""Bottleneck adapters vs LoRA (and IA3, prefix tuning) at a similar parameter count, on the kopitiam data, CPU.

    python benchmarks/adapters_vs_lora.py                  # pretrained tiny Llama, 150 steps per method
    python benchmarks/adapters_vs_lora.py --steps 300 --methods lora,bottleneck-series

One JSON line per method: trainable parameters, training loss (mean of the first / last 10 steps), held-out
token-mean loss before / after, held-out ROUGE-L and BLEU before / after (greedy answers), seconds.
Every method starts from the same pretrained tiny base, sees the same data order and learning-rate schedule.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from typing import Any

#: method name -> trainer options; sizes chosen so the trainable counts are close (hidden 128, 4 layers)
METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "rank": 8, "alpha": 16},                                  # 74,752
    "bottleneck-series": {"method": "bottleneck", "bottleneck_size": 36,
                          "bottleneck_sites": ["attn", "mlp"]},                           # 75,040
    "bottleneck-parallel": {"method": "bottleneck", "bottleneck_size": 36, "bottleneck_placement": "parallel",
                            "bottleneck_sites": ["attn", "mlp"]},                         # 75,040
    "bottleneck-mlp": {"method": "bottleneck", "bottleneck_size": 73},                    # 75,556
    "ia3": {"method": "ia3", "lr": 3e-2},
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 16, "lr": 3e-2},
}


def heldout_loss(model: Any, tok: Any, records: list[dict[str, Any]]) -> float:
    import torch

    from llmtune.data import build_examples, collate
    from llmtune.trainers._loss import model_loss

    batch = collate(build_examples(records, tok, max_length=128), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        total, count = model_loss(model, batch)
    return float(total) / int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--seeds", default="0", help="training seeds (data order, adapter init), comma-separated")
    args = parser.parse_args()

    import torch

    import llmtune
    from llmtune.data import split_instructions
    from llmtune.models.tiny import pretrained_tiny

    torch.set_num_threads(1)
    base, tok, _ = pretrained_tiny(seed=0, steps=args.pretrain_steps)
    train, held = split_instructions()
    held = held[:args.eval_examples]
    for name, seed in ((n, int(s)) for s in args.seeds.split(",") for n in args.methods.split(",")):
        opts = {"lr": args.lr, "batch_size": 8, "warmup": 0.05, "dropout": 0.0, "max_length": 128,
                "eval_examples": args.eval_examples, "max_new_tokens": 24, "progress": False, "seed": seed,
                **METHODS[name]}
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            result = llmtune.get_trainer("lora", **opts).train(model, train, eval_data=held, tokenizer=tok,
                                                               output_dir=out, max_steps=args.steps)
            if name == "prefix_tuning":  # the prefixes live in PEFT's wrapper, reload it to measure
                from peft import PeftModel

                assert result.adapter_dir is not None
                model = PeftModel.from_pretrained(copy.deepcopy(base), str(result.adapter_dir))
            after = heldout_loss(model, tok, held)
        losses = [h["loss"] for h in result.history]
        print(json.dumps({
            "bench": "adapters_vs_lora", "method": name, "seed": seed, "options": METHODS[name],
            "trainable_parameters": result.extra["trainable_parameters"], "steps": len(losses),
            "train_loss_first10": round(sum(losses[:10]) / 10, 4), "train_loss_last10": round(sum(losses[-10:]) / 10, 4),
            "heldout_loss_before": round(heldout_loss(base, tok, held), 4), "heldout_loss_after": round(after, 4),
            "rougeL_before": round(result.eval["before"]["rougeL"], 4),
            "rougeL_after": round(result.eval["after"]["rougeL"], 4),
            "bleu_before": round(result.eval["before"]["bleu"], 2), "bleu_after": round(result.eval["after"]["bleu"], 2),
            "seconds": round(time.perf_counter() - t0, 1), "machine": platform.machine(), "torch": torch.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
