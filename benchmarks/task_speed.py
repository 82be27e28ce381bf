"""Multiple-choice scoring speed: items/s of llmtune's tasks vs lm-evaluation-harness, same model, same run (JSON lines).

For each multiple-choice task (its bundled made-up items) on the tiny Llama (`llmtune.models.tiny`, random init),
it measures, after one warm-up call each:

* ``llmtune``: ``get_task(name).evaluate(model, tok)`` with the shared-prefix KV cache (the default);
* ``llmtune-full``: the same with ``shared_prefix=False`` (one padded forward per batch of choices);
* ``harness-loglikelihood``: ``HFLM(pretrained=model).loglikelihood`` on the very same (context, continuation)
  requests, i.e. the harness's model-side scoring alone;
* ``harness-end-to-end``: ``get_task(name, backend="lm-eval").evaluate``: config, dataset build, requests, scoring.

One JSON line per (task, method) with the median items/s over ``--repeats`` runs, then one ``comparison`` line per
task with the ratios. Results are for this machine only; the ratios are what to compare.

    python benchmarks/task_speed.py                      # CPU, one torch thread
    python benchmarks/task_speed.py --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

TASKS = ("mmlu", "hellaswag", "arc_easy", "boolq", "truthfulqa_mc1", "kopitiam-mc")


def _median_rate(fn: Callable[[], Any], n_items: int, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return n_items / statistics.median(seconds), seconds


def _requests(task: Any) -> list[tuple[str, str]]:
    docs = task.docs()
    items = [task.item(d, i) for i, d in enumerate(docs)]
    contexts = [task.context(d, it, shots) for d, it, shots in zip(docs, items, task.shots(docs))]
    return [(ctx, it.target_delimiter + c) for ctx, it in zip(contexts, items) for c in it.choices]


def run(args: argparse.Namespace) -> None:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import llmtune
    from llmtune.models.tiny import build_tiny_model, train_tiny_tokenizer
    from llmtune.tasks.scoring import CausalLMScorer

    torch.set_num_threads(args.threads)
    tok = train_tiny_tokenizer()
    model = build_tiny_model(tok, seed=0).to(args.device)
    harness_lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    env = {"device": args.device, "torch_threads": torch.get_num_threads(), "batch_size": args.batch_size,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name in args.tasks.split(","):
        task = llmtune.get_task(name)
        n = len(task.docs())
        requests = _requests(task)
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=r, idx=i) for i, r in enumerate(requests)]
        methods: dict[str, Callable[[], Any]] = {
            "llmtune": lambda t=task: t.evaluate(CausalLMScorer(model, tok, batch_size=args.batch_size)),
            "llmtune-full": lambda t=task: t.evaluate(CausalLMScorer(model, tok, batch_size=args.batch_size,
                                                                     shared_prefix=False)),
            "harness-loglikelihood": lambda r=instances: harness_lm.loglikelihood(r, disable_tqdm=True),
            "harness-end-to-end": lambda nm=name: llmtune.get_task(nm, backend="lm-eval").evaluate(
                model, tok, batch_size=args.batch_size),
        }
        rates = {}
        for method, fn in methods.items():
            if method == "harness-end-to-end" and args.skip_end_to_end:
                continue
            rate, seconds = _median_rate(fn, n, args.repeats)
            rates[method] = rate
            print(json.dumps({"task": name, "method": method, "items": n, "requests": len(requests),
                              "items_per_s": round(rate, 2), "seconds": [round(s, 4) for s in seconds], **env}),
                  flush=True)
        print(json.dumps({"task": name, "comparison": True,
                          "llmtune_vs_harness_loglikelihood": round(rates["llmtune"] / rates["harness-loglikelihood"], 3),
                          "llmtune_full_vs_harness_loglikelihood": round(
                              rates["llmtune-full"] / rates["harness-loglikelihood"], 3), **env}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-end-to-end", action="store_true", help="Skip the harness's whole evaluate call.")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
