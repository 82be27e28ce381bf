"""Training tokens/s with padded batches vs packed sequences (block-diagonal mask) vs padding-free, on CPU.

    python benchmarks/packing_speed.py                       # tiny Llama, kopitiam examples, sdpa and eager
    python benchmarks/packing_speed.py --steps 10 --attn sdpa --examples 64

One JSON line per (attention, layout): real (non-padding) tokens per second of forward+backward, the number of
rows and the padded width. The same examples and the same model in every layout; the loss sums agree (printed
as ``loss_sum``) because a pack's per-token losses equal the unpacked ones.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any


def _batches(layout: str, examples: list[Any], pad_id: int, max_length: int, batch: int) -> list[dict[str, Any]]:
    from llmtune.data import collate, pack_examples
    from llmtune.data.packing import padding_free

    if layout == "padded":
        return [collate(examples[i:i + batch], pad_id) for i in range(0, len(examples), batch)]
    if layout == "packed":
        packs = pack_examples(examples, max_length)
        rows = max(1, batch * max(len(e) for e in examples) // max_length)
        return [collate(packs[i:i + rows], pad_id) for i in range(0, len(packs), rows)]
    out = []
    for i in range(0, len(examples), batch):
        flat = padding_free(examples[i:i + batch])
        flat["attention_mask"] = None
        out.append(flat)
    return out


def _run(model: Any, batches: list[dict[str, Any]], steps: int) -> tuple[float, float]:
    from llmtune.trainers._loss import model_loss

    times, loss_total = [], 0.0
    for rep in range(steps + 1):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for b in batches:
            loss, _ = model_loss(model, b, chunk_tokens=0)
            loss.backward()
            loss_sum += float(loss.detach())
        dt = time.perf_counter() - t0
        if rep > 0:  # the first pass warms up
            times.append(dt)
        loss_total = loss_sum
    model.zero_grad(set_to_none=True)
    return statistics.median(times), loss_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="examples per padded batch")
    parser.add_argument("--max-length", type=int, default=256, help="pack length")
    parser.add_argument("--steps", type=int, default=3, help="timed passes over all batches (after one warm-up)")
    parser.add_argument("--attn", default="sdpa,eager")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from llmtune.data import build_examples, split_instructions
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer

    torch.set_num_threads(args.threads)
    tok = train_tiny_tokenizer()
    train, _ = split_instructions()
    examples = build_examples(train[:args.examples], tok, template="llama3", max_length=args.max_length)
    for attn in args.attn.split(","):
        model = build_tiny_model(tok, seed=0)
        model.set_attn_implementation(attn)
        model.train()
        for layout in ("padded", "packed", "padding_free"):
            batches = _batches(layout, examples, tok.pad_token_id, args.max_length, args.batch)
            seconds, loss_sum = _run(model, batches, args.steps)
            tokens = sum(len(e) for e in examples)
            width = max(int(b["input_ids"].shape[1]) for b in batches)
            print(json.dumps({"bench": "packing_speed", "attn": attn, "layout": layout, "examples": len(examples),
                              "tokens": tokens, "rows": sum(int(b["input_ids"].shape[0]) for b in batches),
                              "max_width": width, "computed_positions": sum(b["input_ids"].numel() for b in batches),
                              "seconds_per_pass": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                              "loss_sum": round(loss_sum, 3),
                              "threads": args.threads, "machine": platform.processor() or platform.machine(),
                              "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
