"""Speed of llmtune's NumPy metrics against rouge-score, rouge-score-rs, sacrebleu and NLTK, in one run.

Three corpora, built from ``_corpus.make_corpus`` (generated English, Zipf vocabulary, 1-3 sentences per
example, one sentence per line):

* ``short``: ``--pairs`` (2,000) pairs of ~30 words;
* ``article``: ``--pairs // 4`` pairs of ~560 words on ~40 lines (20 consecutive examples joined);
* ``long``: ``--long-pairs`` (8) pairs of ~5,000 words on ~360 lines.

ROUGE (rouge1, rouge2, rougeL, rougeLsum), stemmer on and off: ``llmtune.get_metric("rouge").compute``
("cold": llmtune's Porter memo emptied first, "warm": kept from the previous call), rouge-score's ``RougeScorer.score`` per pair, and
rouge-score-rs single-threaded (``RAYON_NUM_THREADS=1``; the best of its ``score_batch`` and a ``score`` loop).
rouge-score is O(n*m) in Python, so on ``long`` it runs on ``--official-long-pairs`` pairs and its time is
scaled to the corpus (``official_scaled``: true). BLEU: corpus ``compute`` vs ``sacrebleu.metrics.BLEU``
``corpus_score`` for tokenizers 13a, intl and char, per-example sentence BLEU vs ``sentence_score`` (one
``BLEU(effective_order=True)`` reused, sacrebleu's fastest per-example path), and NLTK's ``corpus_bleu``; BLEU
"ours" empties llmtune's 13a/intl word memo first ("ours_warm": kept). TER: corpus ``compute`` (its per-example values checked too) vs ``sacrebleu.metrics.TER``
``corpus_score`` on the first ``--ter-pairs`` (500) short pairs, defaults and ``normalized``+``case_sensitive``.

Repetitions alternate between implementations; the best wall time of each is kept (``ratio`` = theirs / ours,
> 1 means llmtune is faster), and CPU times (``*_cpu_s``) are given as they are steadier on a shared machine.
Each line says whether the numbers were identical (``equal``) and which machine it ran on (CPU model, its AVX-512
flags, NumPy's dispatched SIMD targets, load average: ``_machine.py``). ``--n-jobs`` adds the parallel mode's scaling.
ROUGE lines also give the fewest minor page faults of one of our calls (``ours_page_faults``), and
``--no-heap-step`` skips ``llmtune.metrics._heap.keep_freed_heap`` for the whole run (``heap_step``: false).
Usage: ``python benchmarks/metrics_speed.py [--pairs 2000] [--repeats 5] [--only rouge|bleu|ter] [--corpora short,article,long] [--no-heap-step]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # rouge-score-rs single-threaded (read when it starts its pool)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _machine
from _corpus import make_corpus

import llmtune

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]


def _time(fn: Callable[[], Any], before: Callable[[], None] | None = None) -> tuple[float, float, Any]:
    """(wall, cpu, result) of one call."""
    if before is not None:
        before()
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t, time.process_time() - c, out


HEAP_STEP = True  # False with --no-heap-step: `llmtune.metrics._heap.keep_freed_heap` never runs
#: per side of the last `_race`, the fewest minor page faults of one of its calls
FAULTS: dict[str, int] = {}


def _race(sides: dict[str, Callable[[], Any]], repeats: int, before: dict[str, Callable[[], None]] | None = None,
          ) -> dict[str, tuple[float, float, Any]]:
    """Best (wall, cpu) of each side over ``repeats`` alternating rounds, with each side's last result."""
    best: dict[str, list[Any]] = {k: [float("inf"), float("inf"), None] for k in sides}
    FAULTS.clear()
    for _ in range(repeats):
        for name, fn in sides.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            wall, cpu, out = _time(fn, (before or {}).get(name))
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            FAULTS[name] = min(FAULTS.get(name, faults), faults)
            b = best[name]
            b[0], b[1], b[2] = min(b[0], wall), min(b[1], cpu), out
    return {k: (v[0], v[1], v[2]) for k, v in best.items()}


def corpora(pairs: int, long_pairs: int) -> dict[str, tuple[list[str], list[str]]]:
    """``short``, ``article`` and ``long`` (prediction, reference) lists."""
    preds, refs = make_corpus(pairs)
    refs1 = [g[0] for g in refs]
    out = {"short": (preds, refs1)}

    def joined(size: int, count: int) -> tuple[list[str], list[str]]:
        p2, r2 = make_corpus(size * count)
        r2_1 = [g[0] for g in r2]
        return (["\n".join(p2[i:i + size]) for i in range(0, size * count, size)],
                ["\n".join(r2_1[i:i + size]) for i in range(0, size * count, size)])

    out["article"] = joined(20, max(1, pairs // 4))
    out["long"] = joined(180, long_pairs)
    return out


def _rouge_equal(ours: Any, rows: list[dict[str, Any]]) -> bool:
    return all(ours.per_example[f"{t}_{m}"][i] == float(getattr(row[t], m))
               for t in ROUGE_TYPES for m in ("precision", "recall", "fmeasure") for i, row in enumerate(rows))


def bench_rouge(name: str, preds: list[str], refs: list[str], stem: bool, repeats: int,
                official_pairs: int | None) -> dict[str, Any]:
    """One corpus, one stemmer setting: ours (cold memo) vs rouge-score-rs vs rouge-score."""
    import rouge_score_rs.rouge_scorer as rs
    from rouge_score import rouge_scorer

    from llmtune.metrics.rouge import clear_caches

    metric = llmtune.get_metric("rouge", rouge_types=ROUGE_TYPES, use_stemmer=stem)
    rs_scorer = rs.RougeScorer(ROUGE_TYPES, use_stemmer=stem)
    k = len(preds) if official_pairs is None else min(official_pairs, len(preds))
    sides = {
        "ours": lambda: metric.compute(preds, refs),
        "ours_warm": lambda: metric.compute(preds, refs),
        "rs_batch": lambda: rs_scorer.score_batch(refs, preds),
        "rs_loop": lambda: [rs_scorer.score(r, p) for r, p in zip(refs, preds)],
    }
    got = _race(sides, repeats, before={"ours": clear_caches})
    faults = dict(FAULTS)
    scorer = rouge_scorer.RougeScorer(ROUGE_TYPES, use_stemmer=stem)
    off = _race({"rouge_score": lambda: [scorer.score(r, p) for r, p in zip(refs[:k], preds[:k])]},
                repeats if name == "short" else 1)["rouge_score"]
    scale = len(preds) / k
    ours_wall, ours_cpu, res = got["ours"]
    rs_name = min(("rs_batch", "rs_loop"), key=lambda s: got[s][0])
    rs_wall, rs_cpu, rs_rows = got[rs_name]
    ref_rows = off[2]
    equal_official = _rouge_equal(_Sliced(res, k), ref_rows)
    equal_rs = _rouge_equal(res, rs_rows)
    return {
        "benchmark": "metrics_speed", "metric": "rouge", "corpus": name, "pairs": len(preds),
        "words_per_text": round(sum(len(p.split()) for p in preds) / len(preds)), "types": ROUGE_TYPES,
        "use_stemmer": stem, "ours_s": ours_wall, "ours_cpu_s": ours_cpu, "ours_warm_s": got["ours_warm"][0],
        "ours_warm_cpu_s": got["ours_warm"][1], "ratio_warm_vs_rouge_score_rs": rs_wall / got["ours_warm"][0],
        "rouge_score_rs_s": rs_wall, "rouge_score_rs_cpu_s": rs_cpu, "rouge_score_rs_call": rs_name,
        "rouge_score_s": off[0] * scale, "rouge_score_cpu_s": off[1] * scale, "official_scaled": k != len(preds),
        "official_pairs": k, "ratio_vs_rouge_score_rs": rs_wall / ours_wall, "cpu_ratio_vs_rouge_score_rs":
        rs_cpu / ours_cpu, "ratio_vs_rouge_score": off[0] * scale / ours_wall,
        "equal_rouge_score": equal_official, "equal_rouge_score_rs": equal_rs, "repeats": repeats,
        "ours_page_faults": faults["ours"], "ours_warm_page_faults": faults["ours_warm"],
        "heap_step": HEAP_STEP,
    }


class _Sliced:
    """The first ``k`` per-example values of a result."""

    def __init__(self, res: Any, k: int) -> None:
        self.per_example = {key: res.per_example[key][:k] for key in res.per_example}


def bench_bleu(preds: list[str], refs: list[str], repeats: int) -> list[dict[str, Any]]:
    """Corpus BLEU per tokenizer vs sacrebleu, sentence BLEU vs sacrebleu, corpus BLEU vs NLTK."""
    from nltk.translate.bleu_score import corpus_bleu
    from sacrebleu.metrics import BLEU

    from llmtune.metrics._bleu_tokenizers import clear_caches

    rows = []
    cold = {"ours": clear_caches}  # "ours": the 13a/intl word memo emptied first; "ours_warm": kept
    for tok in ("13a", "intl", "char"):
        metric = llmtune.get_metric("bleu", tokenize=tok)
        got = _race({"ours": lambda m=metric: m.compute(preds, refs),  # type: ignore[misc]
                     "ours_warm": lambda m=metric: m.compute(preds, refs),  # type: ignore[misc]
                     "sacrebleu": lambda t=tok: BLEU(tokenize=t).corpus_score(preds, [refs])},  # type: ignore[misc]
                    repeats, before=cold)
        res, off = got["ours"][2], got["sacrebleu"][2]
        equal = list(res.scores.values()) == [off.score, off.bp, off.sys_len, off.ref_len, *off.precisions]
        rows.append(_bleu_row(f"corpus tokenize={tok}", "sacrebleu", got, equal, len(preds), repeats))
    # what a sacrebleu user does per example: one BLEU(effective_order=True), sentence_score per pair (faster
    # than sacrebleu.sentence_bleu, which builds a new BLEU object per call); same smoothing ("exp") and order
    sacre = BLEU(effective_order=True)
    metric_eff = llmtune.get_metric("bleu", effective_order=True)
    got = _race({"ours": lambda: metric_eff.compute(preds, refs).per_example["bleu"],
                 "ours_warm": lambda: metric_eff.compute(preds, refs).per_example["bleu"],
                 "sacrebleu": lambda: [sacre.sentence_score(p, [r]).score for p, r in zip(preds, refs)]}, repeats,
                before=cold)
    equal = list(got["ours"][2]) == got["sacrebleu"][2]
    rows.append(_bleu_row("sentence (effective_order)", "sacrebleu", got, equal, len(preds), repeats))
    nltk_metric = llmtune.get_metric("bleu", definition="nltk", smoothing=1)
    hyps, toks = [p.split() for p in preds], [[r.split()] for r in refs]
    from nltk.translate.bleu_score import SmoothingFunction

    got = _race({"ours": lambda: nltk_metric.compute(preds, refs).scores["bleu"],
                 "nltk": lambda: corpus_bleu(toks, hyps, smoothing_function=SmoothingFunction().method1)}, repeats)
    rows.append(_bleu_row("corpus definition=nltk smoothing=1", "nltk", got, got["ours"][2] == got["nltk"][2],
                          len(preds), repeats))
    return rows


def _bleu_row(what: str, official: str, got: dict[str, tuple[float, float, Any]], equal: bool, pairs: int,
              repeats: int) -> dict[str, Any]:
    ours, theirs = got["ours"], got[official]
    row = {"benchmark": "metrics_speed", "metric": "bleu", "what": what, "pairs": pairs, "official": official,
           "ours_s": ours[0], "ours_cpu_s": ours[1], "official_s": theirs[0], "official_cpu_s": theirs[1],
           "ratio": theirs[0] / ours[0], "cpu_ratio": theirs[1] / ours[1], "equal": equal, "repeats": repeats}
    if "ours_warm" in got:
        row |= {"ours_warm_s": got["ours_warm"][0], "ratio_warm": theirs[0] / got["ours_warm"][0]}
    return row


def bench_ter(preds: list[str], refs: list[str], repeats: int) -> list[dict[str, Any]]:
    """Corpus TER (and every sentence TER) vs ``sacrebleu.metrics.TER``, default and normalized options."""
    from sacrebleu.metrics import TER

    from llmtune.metrics.ter import ter_tokenize

    rows = []
    settings: list[dict[str, Any]] = [{}, {"normalized": True, "case_sensitive": True}]
    for opts in settings:
        metric = llmtune.get_metric("ter", **opts)
        sacre = TER(**opts)
        got = _race({"ours": lambda m=metric: m.compute(preds, refs),  # type: ignore[misc]
                     "sacrebleu": lambda t=sacre: t.corpus_score(preds, [refs])},  # type: ignore[misc]
                    repeats, before={"ours": ter_tokenize.cache_clear})
        res, off = got["ours"][2], got["sacrebleu"][2]
        sent = [TER(**opts).sentence_score(p, [r]).score for p, r in zip(preds, refs)]
        equal = res.scores["ter"] == off.score and list(res.per_example["ter"]) == sent
        label = ",".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        rows.append(_bleu_row(f"corpus TER {label}", "sacrebleu", got, equal, len(preds), repeats)
                    | {"metric": "ter"})
    return rows


def bench_n_jobs(name: str, preds: list[str], refs: list[str], jobs: list[int], repeats: int) -> list[dict[str, Any]]:
    """ROUGE with ``n_jobs`` worker processes vs serial: time per core count, and identical results."""
    serial = llmtune.get_metric("rouge", rouge_types=ROUGE_TYPES, use_stemmer=True).compute(preds, refs)
    sides = {str(j): (lambda j=j: llmtune.get_metric("rouge", rouge_types=ROUGE_TYPES, use_stemmer=True,
                                                     n_jobs=j).compute(preds, refs)) for j in jobs}
    got = _race(sides, repeats)  # type: ignore[arg-type]
    base = got[str(jobs[0])][0]
    return [{"benchmark": "metrics_speed", "metric": "rouge", "what": "n_jobs scaling", "corpus": name,
             "pairs": len(preds), "n_jobs": j, "seconds": got[str(j)][0], "speedup_vs_first": base / got[str(j)][0],
             "identical_to_serial": got[str(j)][2].scores == serial.scores and all(
                 got[str(j)][2].per_example[k].tolist() == v.tolist() for k, v in serial.per_example.items()),
             "repeats": repeats} for j in jobs]


def main(argv: list[str] | None = None) -> None:
    """Build the corpora once, run every comparison, print one JSON line per result."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--long-pairs", type=int, default=8)
    parser.add_argument("--official-long-pairs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["rouge", "bleu", "ter"], default=None)
    parser.add_argument("--corpora", default="short,article,long")
    parser.add_argument("--ter-pairs", type=int, default=500, help="short pairs for TER (sacrebleu's is slow)")
    parser.add_argument("--n-jobs", default="", help="e.g. 1,2: ROUGE n_jobs scaling on the article corpus")
    parser.add_argument("--no-heap-step", action="store_true",
                        help="skip llmtune.metrics._heap.keep_freed_heap (its effect on page faults and time)")
    args = parser.parse_args(argv)
    if args.no_heap_step:
        global HEAP_STEP
        import llmtune.metrics._heap as heap

        heap._done, HEAP_STEP = True, False
    data = corpora(args.pairs, args.long_pairs)
    machine = _machine.machine()
    wanted = args.corpora.split(",")
    if args.only in (None, "rouge"):
        for name in wanted:
            for stem in (True, False):
                preds, refs = data[name]
                row = bench_rouge(name, preds, refs, stem, args.repeats,
                                  args.official_long_pairs if name == "long" else None)
                print(json.dumps({**row, **machine}), flush=True)
    if args.n_jobs:
        for row in bench_n_jobs("article", *data["article"], [int(j) for j in args.n_jobs.split(",")], args.repeats):
            print(json.dumps({**row, **machine}), flush=True)
    if args.only in (None, "bleu"):
        for name in [w for w in wanted if w != "long"]:
            for row in bench_bleu(*data[name], args.repeats):
                print(json.dumps({**row, "corpus": name, **machine}), flush=True)
    if args.only in (None, "ter") and args.ter_pairs > 0 and "short" in wanted:
        preds, refs = data["short"]
        for row in bench_ter(preds[:args.ter_pairs], refs[:args.ter_pairs], min(args.repeats, 2)):
            print(json.dumps({**row, "corpus": "short", **machine}), flush=True)


if __name__ == "__main__":
    main()
