"""Paired significance tests between systems, as sacrebleu's ``--paired-bs`` / ``--paired-ar`` compute them.

``compare(baseline, *systems, references=..., metric="bleu", test="bs")`` returns, for the baseline and every
system, its corpus score and (from the bootstrap resamples) ``mean`` and ``ci`` (half the 95% interval),
and for every system the p-value of its difference from the baseline. With the same seed (sacrebleu's
default ``SACREBLEU_SEED=12345``) the numbers equal sacrebleu's ``PairedTest`` bit for bit: the same NumPy
generator calls in the same order, the same per-segment sufficient statistics (``float32`` for the bootstrap,
integers for approximate randomization, as sacrebleu has them) and the same final formula.

* ``test="bs"`` (paired bootstrap resampling, Koehn 2004; default 1000 resamples): both systems are scored
  on the same resampled segment sets; p = (#{|d*| - mean|d*| > |d|} + 1) / (n + 1).
* ``test="ar"`` (approximate randomization, Riezler and Maxwell 2005; default 10,000 trials): each trial swaps
  each segment's outputs between the two systems with probability 1/2; p = (#{|d*| > |d|} + 1) / (n + 1).

Metrics: ``bleu`` (sacrebleu's definition and options), ``chrf`` and ``ter`` use their corpus statistics; ``rouge``
(a mean of per-example values) uses the per-example ``key`` (default ``rougeL_fmeasure``), as a mean.
`bootstrap_ci` gives sacrebleu's ``corpus_score(n_bootstrap=...)`` mean and interval for one system.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.metrics._inputs import check_corpus, nrefs_field

__all__ = ["ComparisonResult", "SystemResult", "bootstrap_ci", "compare"]

DEFAULT_SEED = 12345  # sacrebleu's SACREBLEU_SEED default
_DEFAULT_SAMPLES = {"bs": 1000, "ar": 10000}


@dataclasses.dataclass(frozen=True)
class SystemResult:
    """One system's corpus ``score``, bootstrap ``mean`` and ``ci`` (None when not estimated), ``p_value``
    of its difference from the baseline (None for the baseline)."""

    score: float
    p_value: float | None = None
    mean: float | None = None
    ci: float | None = None


@dataclasses.dataclass(frozen=True)
class ComparisonResult:
    """``baseline`` and one `SystemResult` per compared system, in order; ``signature`` says how."""

    baseline: SystemResult
    systems: list[SystemResult]
    signature: str


@dataclasses.dataclass
class _Scorer:
    """Per-segment sufficient statistics of a system, and the corpus score of summed statistics."""

    stats: Callable[[list[str]], np.ndarray]
    score: Callable[[np.ndarray], float]
    signature: str
    float32: bool = True  # sacrebleu sums bootstrap statistics as float32 (its metrics); ROUGE keeps float64


def _scorer(metric: str, refs: list[list[str]], key: str | None, options: dict[str, Any]) -> _Scorer:
    from llmtune.core.registry import get_metric

    m = get_metric(metric, **options)
    if metric == "bleu":
        return _bleu_scorer(m, refs)
    if metric == "chrf":
        from llmtune.metrics.chrf import chrf_f_score, chrf_signature, chrf_statistics

        return _Scorer(lambda preds: np.asarray(chrf_statistics(preds, refs, m.options), dtype=np.int64),
                       lambda s: chrf_f_score(list(s), m.options),
                       chrf_signature(m.options, nrefs_field(refs), "llmtune-numpy"))
    if metric == "ter":
        from llmtune.metrics.ter import ter_score, ter_signature, ter_statistics

        return _Scorer(lambda preds: np.asarray(ter_statistics(preds, refs, m.options), dtype=np.float64),
                       lambda s: ter_score(s[0], s[1]), ter_signature(m.options, nrefs_field(refs), "llmtune-numpy"))
    if metric == "rouge":
        name = key or "rougeL_fmeasure"

        def stats(preds: list[str]) -> np.ndarray:
            values = m.compute(preds, refs).per_example
            if name not in values:
                raise InvalidOptionError(f"key={name!r} is not a ROUGE result key; use one of {', '.join(values)}")
            return np.asarray(values[name], dtype=np.float64)[:, None]

        n = len(refs)
        return _Scorer(stats, lambda s: float(s[0]) / n, f"rouge|key:{name}|nrefs:{nrefs_field(refs)}",
                       float32=False)
    raise InvalidOptionError(f"metric={metric!r}: compare supports 'bleu', 'chrf', 'ter' and 'rouge'")


def _bleu_scorer(m: Any, refs: list[list[str]]) -> _Scorer:
    from llmtune.metrics._bleu_tokenizers import encode
    from llmtune.metrics.bleu import sacrebleu_score, segment_stats_ids

    opts = m.options
    if opts.definition != "sacrebleu":
        raise InvalidOptionError("compare(metric='bleu') follows sacrebleu: definition='nltk' is not supported")
    order = opts.order

    def stats(preds: list[str]) -> np.ndarray:
        ids, lens = encode(preds + [r for g in refs for r in g], opts.tokenizer, bool(opts.lowercase))
        st = segment_stats_ids(ids, lens, [len(g) for g in refs], order)
        return np.column_stack([st.hyp_len, st.ref_len, st.correct, st.total]).astype(np.int64)

    def score(s: np.ndarray) -> float:  # sacrebleu's BLEU._compute_score_from_stats, element types kept
        return sacrebleu_score(list(s[2:2 + order]), list(s[2 + order:]), int(s[0]), int(s[1]), opts)[0]

    from llmtune.metrics.bleu import bleu_signature

    return _Scorer(stats, score, bleu_signature(opts, [len(g) for g in refs], "llmtune-numpy"))


def _estimate_ci(scores: np.ndarray) -> tuple[float, float]:
    """sacrebleu's ``estimate_ci``: the mean and half the width of the 95% percentile interval."""
    scores = np.sort(scores)
    lower_idx = len(scores) // 40
    upper_idx = len(scores) - lower_idx - 1
    return float(scores.mean()), float(0.5 * (scores[upper_idx] - scores[lower_idx]))


def _resampled_scores(sc: _Scorer, stats: np.ndarray, idxs: np.ndarray) -> np.ndarray:
    """Scores of the resampled segment sets ``idxs`` (one row each); statistics summed as sacrebleu sums them
    (``float32`` for its metrics, float64 for ROUGE's per-example values)."""
    n_rows, n = idxs.shape
    counts = np.bincount((np.arange(n_rows)[:, None] * n + idxs).ravel(), minlength=n_rows * n)
    counts = counts.reshape(n_rows, n).astype(np.float64)
    if not sc.float32:
        return np.array([sc.score(s) for s in counts @ stats])
    if np.issubdtype(stats.dtype, np.integer) and int(np.abs(stats).sum(axis=0).max(initial=0)) < 1 << 24:
        # every partial sum is an integer that float32 holds exactly: a float64 product gives sacrebleu's sums
        return np.array([sc.score(s) for s in (counts @ stats.astype(np.float64)).astype(np.float32)])
    stats32 = stats.astype(np.float32)
    return np.array([sc.score(stats32[row].sum(0)) for row in idxs])


def bootstrap_ci(predictions: Iterable[str], references: Iterable[Any], metric: str = "bleu", *,
                 n_samples: int = 1000, seed: int | None = DEFAULT_SEED, key: str | None = None,
                 **options: Any) -> SystemResult:
    """One system's score with sacrebleu's bootstrap ``mean`` and ``ci`` (``corpus_score(n_bootstrap=n)``)."""
    _check_count("n_samples", n_samples, 1)
    _check_seed(seed)
    preds, refs = check_corpus(predictions, references, metric)
    sc = _scorer(metric, refs, key, options)
    stats = sc.stats(preds)
    idxs = np.random.default_rng(seed).choice(len(stats), size=(n_samples, len(stats)), replace=True)
    # sacrebleu's Score.estimate_ci: sorted Python list, statistics.mean (exact, rounded to the scores' type)
    raw = sorted(_resampled_scores(sc, stats, idxs).tolist() if not sc.float32 else
                 list(_resampled_scores(sc, stats, idxs)))
    lower_idx = len(raw) // 40
    mean, ci = float(statistics.mean(raw)), float(0.5 * (raw[len(raw) - lower_idx - 1] - raw[lower_idx]))
    return SystemResult(float(sc.score(stats.sum(0))), None, mean, ci)


def compare(baseline: Iterable[str], *systems: Iterable[str], references: Iterable[Any], metric: str = "bleu",
            test: str = "bs", n_samples: int = 0, n_ar_confidence: int = -1, seed: int | None = DEFAULT_SEED,
            key: str | None = None, **options: Any) -> ComparisonResult:
    """Paired test of every system against ``baseline`` on the same ``references`` (sacrebleu's PairedTest).

    ``n_samples`` 0 means sacrebleu's default (1000 resamples for ``bs``, 10,000 trials for ``ar``);
    ``n_ar_confidence`` (``ar`` only): bootstrap resamples for ``mean``/``ci`` (-1: none, 0: 1000).
    ``options`` are the metric's options (e.g. ``tokenize="intl"``).
    """
    if test not in _DEFAULT_SAMPLES:
        raise InvalidOptionError(f"test={test!r} must be 'bs' (paired bootstrap) or 'ar' (approximate randomization)")
    if not systems:
        raise InvalidOptionError("compare needs at least one system besides the baseline")
    _check_count("n_samples", n_samples, 0, "0 = the default")
    _check_count("n_ar_confidence", n_ar_confidence, -1, "-1 = none, 0 = 1000")
    _check_seed(seed)
    base, refs = check_corpus(baseline, references, metric)
    outs = [check_corpus(s, refs, metric)[0] for s in systems]
    sc = _scorer(metric, refs, key, options)
    n = n_samples if n_samples > 0 else _DEFAULT_SAMPLES[test]
    n_conf = n_ar_confidence if n_ar_confidence != 0 else _DEFAULT_SAMPLES["bs"]
    bl_stats = sc.stats(base)
    bl_score = float(sc.score(bl_stats.sum(0)))
    conf_n = n if test == "bs" else n_conf
    bl_mean = bl_ci = None
    if conf_n > 0:
        idxs = np.random.default_rng(seed).choice(len(base), size=(conf_n, len(base)), replace=True)
        bl_mean, bl_ci = _estimate_ci(_resampled_scores(sc, bl_stats, idxs))
    run = _paired_bs if test == "bs" else _paired_ar
    results = [run(sc, bl_stats, bl_score, sc.stats(out), n, n_conf, seed) for out in outs]
    signature = f"{sc.signature}|test:{test}|n:{n}|seed:{str(seed).lower()}"
    return ComparisonResult(SystemResult(bl_score, None, bl_mean, bl_ci), results, signature)


def _check_count(field: str, value: object, minimum: int, meaning: str = "") -> None:
    """An int >= ``minimum`` (not a bool, not a float): resample counts, where a negative used to mean the default."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        say = f" ({meaning})" if meaning else ""
        raise InvalidOptionError(f"{field}={value!r} must be an integer >= {minimum}{say}", field=field)


def _check_seed(seed: object) -> None:
    """None (fresh entropy) or an int >= 0, what NumPy's generator takes."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise InvalidOptionError(f"seed={seed!r} must be None or an integer >= 0", field="seed")


def _p_value(stats: np.ndarray, real_difference: float) -> float:
    return (int(np.sum(stats > real_difference)) + 1) / (len(stats) + 1)


def _paired_bs(sc: _Scorer, bl_stats: np.ndarray, bl_score: float, sys_stats: np.ndarray, n: int, n_conf: int,
               seed: int | None) -> SystemResult:
    """sacrebleu's ``_paired_bs_test`` for one system."""
    rng = np.random.default_rng(seed)
    idxs = rng.choice(len(sys_stats), size=(n, len(sys_stats)), replace=True)
    sys_score = float(sc.score(sys_stats.sum(0)))
    diff = abs(bl_score - sys_score)
    scores_bl = _resampled_scores(sc, bl_stats, idxs)
    scores_sys = _resampled_scores(sc, sys_stats, idxs)
    mean, ci = _estimate_ci(scores_sys)
    sample_diffs = np.abs(scores_sys - scores_bl)
    return SystemResult(sys_score, _p_value(sample_diffs - sample_diffs.mean(), diff), mean, ci)


def _paired_ar(sc: _Scorer, bl_stats: np.ndarray, bl_score: float, sys_stats: np.ndarray, n: int, n_conf: int,
               seed: int | None) -> SystemResult:
    """sacrebleu's ``_paired_ar_test`` for one system."""
    rng = np.random.default_rng(seed)
    pos_sel = rng.integers(2, size=(n, len(sys_stats)), dtype=bool)
    bs_idxs = rng.choice(len(sys_stats), size=(n_conf, len(sys_stats)), replace=True) if n_conf > 0 else None
    sys_score = float(sc.score(sys_stats.sum(0)))
    diff = abs(bl_score - sys_score)
    neg_sel = ~pos_sel
    shuf_a = pos_sel @ bl_stats + neg_sel @ sys_stats
    shuf_b = neg_sel @ bl_stats + pos_sel @ sys_stats
    scores_a = np.array([sc.score(x) for x in shuf_a])
    scores_b = np.array([sc.score(x) for x in shuf_b])
    mean = ci = None
    if bs_idxs is not None:
        mean, ci = _estimate_ci(_resampled_scores(sc, sys_stats, bs_idxs))
    return SystemResult(sys_score, _p_value(np.abs(scores_a - scores_b), diff), mean, ci)
