"""Speed of llmtune's NumPy metrics against the official libraries, on one 2,000-pair corpus, in one run.

* ROUGE (rouge1, rouge2, rougeL, rougeLsum, Porter stemmer): ``llmtune.get_metric("rouge", ...).compute``
  vs ``rouge_score.rouge_scorer.RougeScorer(...).score`` over every pair.
* Corpus BLEU (sacrebleu's defaults): ``llmtune.get_metric("bleu").compute`` vs
  ``sacrebleu.metrics.BLEU().corpus_score`` (per-example values are lazy in llmtune and not computed).

Every measurement uses fresh objects; repetitions alternate between the two sides and the best time of each
is reported (``ratio`` = official / ours). For ROUGE, ``cold`` clears llmtune's memoised stemmer before each
repetition (the honest first-call number) and ``warm`` keeps it. Each line also says whether the numbers were
equal, and gives CPU times (``*_cpu_s``, ``cpu_ratio``), which other processes on a shared machine disturb less. Usage: ``python benchmarks/metrics_speed.py [--pairs 2000] [--repeats 5]``; one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _corpus import make_corpus

import llmtune

CPU: dict[str, list[float]] = {}


def _best(fn: Callable[[], Any], before: Callable[[], None] | None = None, label: str = "") -> tuple[float, Any]:
    """Wall time of one call (its CPU time is appended to ``CPU[label]``: robust on a shared machine)."""
    if before is not None:
        before()
    c = time.process_time()
    t = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    CPU.setdefault(label, []).append(time.process_time() - c)
    return wall, out


def _machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()}


def bench_rouge(preds: list[str], refs: list[list[str]], repeats: int) -> list[dict[str, Any]]:
    """Our ROUGE (cold and warm stemmer cache) vs rouge-score on the same pairs."""
    from rouge_score import rouge_scorer

    from llmtune.metrics import _porter

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    refs1 = [g[0] for g in refs]

    def ours() -> Any:
        return llmtune.get_metric("rouge", rouge_types=types, use_stemmer=True).compute(preds, refs1)

    def theirs() -> Any:
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
        return [scorer.score(r, p) for r, p in zip(refs1, preds)]

    def clear() -> None:
        _porter._CACHE.clear()

    cold, warm, official = [], [], []
    res = off = None
    for _ in range(repeats):
        t, res = _best(ours, clear, "rouge_cold")
        cold.append(t)
        t, res = _best(ours, label="rouge_warm")
        warm.append(t)
        t, off = _best(theirs, label="rouge_official")
        official.append(t)
    assert res is not None and off is not None
    equal = all(
        list(res.per_example[f"{t}_{m}"]) == [float(getattr(row[t], m)) for row in off]
        for t in types for m in ("precision", "recall", "fmeasure")
    )
    out = []
    for label, times in (("cold", cold), ("warm", warm)):
        out.append({
            "benchmark": "metrics_speed", "metric": "rouge", "types": types, "use_stemmer": True,
            "cache": label, "pairs": len(preds), "ours_s": min(times), "official": "rouge-score",
            "official_s": min(official), "ratio": min(official) / min(times),
            "ours_cpu_s": min(CPU[f"rouge_{label}"]), "official_cpu_s": min(CPU["rouge_official"]),
            "cpu_ratio": min(CPU["rouge_official"]) / min(CPU[f"rouge_{label}"]), "equal": equal, "repeats": repeats,
        })
    return out


def bench_bleu(preds: list[str], refs: list[list[str]], repeats: int) -> list[dict[str, Any]]:
    """Our corpus BLEU ``compute()`` vs sacrebleu ``corpus_score`` (default options: 13a, exp, order 4)."""
    from sacrebleu.metrics import BLEU

    streams = [[g[0] for g in refs]]
    ours_t, theirs_t = [], []
    res = off = None
    for _ in range(repeats):
        t, res = _best(lambda: llmtune.get_metric("bleu").compute(preds, refs), label="bleu_ours")
        ours_t.append(t)
        t, off = _best(lambda: BLEU().corpus_score(preds, streams), label="bleu_official")
        theirs_t.append(t)
    assert res is not None and off is not None
    equal = list(res.scores.values()) == [off.score, off.bp, off.sys_len, off.ref_len, *off.precisions]
    return [{
        "benchmark": "metrics_speed", "metric": "bleu", "what": "corpus compute() vs corpus_score",
        "pairs": len(preds), "ours_s": min(ours_t), "official": "sacrebleu", "official_s": min(theirs_t),
        "ratio": min(theirs_t) / min(ours_t), "ours_cpu_s": min(CPU["bleu_ours"]),
        "official_cpu_s": min(CPU["bleu_official"]), "cpu_ratio": min(CPU["bleu_official"]) / min(CPU["bleu_ours"]),
        "equal": equal, "bleu": res.scores["bleu"], "repeats": repeats,
    }]


def main(argv: list[str] | None = None) -> None:
    """Build the corpus once, run both comparisons, print one JSON line per result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["rouge", "bleu"], default=None)
    args = parser.parse_args(argv)
    preds, refs = make_corpus(args.pairs)
    machine = _machine()
    rows: list[dict[str, Any]] = []
    if args.only in (None, "rouge"):
        rows += bench_rouge(preds, refs, args.repeats)
    if args.only in (None, "bleu"):
        rows += bench_bleu(preds, refs, args.repeats)
    for row in rows:
        print(json.dumps({**row, **machine}), flush=True)


if __name__ == "__main__":
    main()
