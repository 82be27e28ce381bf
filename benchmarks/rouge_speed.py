"""ROUGE speed: llmtune's NumPy backend vs rouge-score on the same corpus; one JSON line per result.

    .venv/bin/python benchmarks/rouge_speed.py [--n 2000] [--repeat 3] [--refs 1]

Both compute rouge1, rouge2, rougeL, rougeLsum with the stemmer. Ours is timed "cold" (the Porter
memo emptied before every run, so stemming is paid for) and the best of ``--repeat`` runs is kept for
both (wall clock; process CPU time is reported too, as it is steadier on a shared machine). The results
are also checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _corpus import make_corpus

TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def main() -> None:
    """Time both implementations and print the ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--no-stemmer", action="store_true")
    args = ap.parse_args()
    stem = not args.no_stemmer

    from rouge_score import rouge_scorer

    from llmtune.metrics import _porter
    from llmtune.metrics.rouge import NumpyRouge

    preds, refs = make_corpus(args.n, n_refs=args.refs)
    scorer = rouge_scorer.RougeScorer(TYPES, use_stemmer=stem)

    def official() -> list[dict]:
        if args.refs == 1:
            return [scorer.score(r[0], p) for p, r in zip(preds, refs)]
        return [scorer.score_multi(r, p) for p, r in zip(preds, refs)]

    metric = NumpyRouge(rouge_types=TYPES, use_stemmer=stem)

    def ours():  # type: ignore[no-untyped-def]
        _porter._CACHE.clear()
        return metric.compute(preds, refs)

    t_off, t_ours = float("inf"), float("inf")
    cpu_off, cpu_ours = float("inf"), float("inf")
    for _ in range(args.repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        expected = official()
        t_off, cpu_off = min(t_off, time.perf_counter() - t0), min(cpu_off, time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        got = ours()
        t_ours, cpu_ours = min(t_ours, time.perf_counter() - t0), min(cpu_ours, time.process_time() - c0)

    mismatches = 0
    for t in TYPES:
        for k, measure in enumerate(("precision", "recall", "fmeasure")):
            col = got.per_example[f"{t}_{measure}"]
            mismatches += sum(1 for i, e in enumerate(expected) if col[i] != e[t][k])

    base = {"metric": "rouge", "types": TYPES, "stemmer": stem, "pairs": args.n, "refs": args.refs,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "python": platform.python_version()}
    for impl, wall, cpu in (("rouge-score", t_off, cpu_off), ("llmtune-numpy", t_ours, cpu_ours)):
        print(json.dumps({**base, "impl": impl, "seconds": round(wall, 4), "cpu_seconds": round(cpu, 4),
                          "pairs_per_s": round(args.n / wall)}))
    print(json.dumps({**base, "ratio": round(t_off / t_ours, 2), "cpu_ratio": round(cpu_off / cpu_ours, 2),
                      "mismatches": mismatches}))


if __name__ == "__main__":
    main()
