"""GRPO with verifiable rewards on SmolLM2-135M-Instruct, on made-up arithmetic prompts (CPU).

The bundled prompts (`llmtune/data/bundled/arithmetic.jsonl`: 112 additions / subtractions of numbers 2..30 with
their answers, generated once with a fixed seed) are split 72 train / 40 held out. Objective ``grpo`` (LoRA on
every linear layer, reference = the adapter off) trains with two reward functions: ``numeric_answer``
(``extract="last"``: the last number of the answer equals the record's ``answer``, weight 1) and ``format``
(the answer is just a number, weight 0.2). Before and after, the held-out prompts are answered greedily:
exact-answer accuracy (the last number equals the answer) and the format rate. One JSON line per result.

    python benchmarks/grpo_arithmetic.py --model /work/models/smollm2-hf --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

REWARDS = [{"name": "numeric_answer", "extract": "last", "weight": 1.0},
           {"name": "format", "pattern": r"-?\d+", "mode": "fullmatch", "weight": 0.2}]


def _records() -> list[dict[str, Any]]:
    text = resources.files("llmtune.data").joinpath("bundled/arithmetic.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _evaluate(model: Any, tok: Any, records: list[dict[str, Any]], template: str) -> dict[str, float]:
    """Greedy answers to the held-out prompts: exact-answer accuracy and format rate (the two reward functions)."""
    import llmtune
    from llmtune.data.templates import stop_token_ids
    from llmtune.trainers.objectives.online import prompt_text
    from llmtune.trainers.rlhf.online import sample

    prompts = [tok(prompt_text(r, template, tok, f"held-out[{i}]"), add_special_tokens=False)["input_ids"]
               for i, r in enumerate(records)]
    answers: list[str] = []
    for start in range(0, len(prompts), 8):
        out = sample(model, prompts[start:start + 8], k=1, pad_id=tok.pad_token_id,
                     stop_ids=stop_token_ids(template, tok), max_new_tokens=16, do_sample=False)
        answers.extend(tok.decode(c, skip_special_tokens=True) for c in out)
    gold = [r["answer"] for r in records]
    exact = llmtune.get_reward("numeric_answer", extract="last")(["" for _ in answers], answers, answer=gold)
    fmt = llmtune.get_reward("format", pattern=r"-?\d+", mode="fullmatch")(["" for _ in answers], answers)
    return {"exact_answer_accuracy": sum(float(x or 0) for x in exact) / len(exact),
            "format_rate": sum(float(x or 0) for x in fmt) / len(fmt), "example": answers[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/models/smollm2-hf")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmtune

    torch.set_num_threads(args.threads)
    records = _records()
    train, held = records[:72], records[72:]
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    template = "tokenizer"
    machine = {"cpu": "AMD EPYC (AVX-512, AVX512-BF16)", "threads": args.threads, "load_1min": os.getloadavg()[0]}
    before = _evaluate(base, tok, held, template)
    print(json.dumps({"result": "before", **before, **machine}), flush=True)

    trainer = llmtune.get_trainer("grpo", method="lora", rank=16, alpha=32, lr=args.lr, max_steps=args.steps,
                                  batch_size=args.batch_size, samples=args.samples, max_new_tokens=args.max_new_tokens,
                                  temperature=1.0, kl_coef=args.kl_coef, loss_type=args.loss_type, warmup=0,
                                  template=template, reward_funcs=REWARDS, seed=args.seed, progress=False,
                                  num_threads=args.threads)
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        result = trainer.train(base, train, tokenizer=tok, output_dir=out)
        seconds = time.perf_counter() - t
        steps = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
        steps = [s for s in steps if "reward" in s]
        fresh = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tuned = PeftModel.from_pretrained(fresh, str(result.adapter_dir)).eval()
        after = _evaluate(tuned, tok, held, template)
    k = max(1, len(steps) // 5)
    first = sum(s["reward"] for s in steps[:k]) / k
    last = sum(s["reward"] for s in steps[-k:]) / k
    print(json.dumps({"result": "train", "steps": len(steps), "seconds": round(seconds, 1),
                      f"reward_first_{k}_steps": round(first, 4), f"reward_last_{k}_steps": round(last, 4),
                      "numeric_first": round(sum(s["rewards/numeric_answer/mean"] for s in steps[:k]) / k, 4),
                      "numeric_last": round(sum(s["rewards/numeric_answer/mean"] for s in steps[-k:]) / k, 4),
                      "loss_type": args.loss_type, "lr": args.lr, "samples": args.samples,
                      "prompts_per_step": args.batch_size, **machine}), flush=True)
    print(json.dumps({"result": "after", **after, **machine}), flush=True)


if __name__ == "__main__":
    main()
