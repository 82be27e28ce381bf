"""Adapters over the official libraries: rouge-score, sacrebleu and NLTK.

Each takes the same options (the same Options dataclasses) and returns the same keys, scales and
signature layout as the NumPy backend of the same metric, so one word switches implementation::

    llmtune.get_metric("bleu")                        # NumPy, sacrebleu's definition
    llmtune.get_metric("bleu", backend="sacrebleu")   # sacrebleu itself
    llmtune.get_metric("bleu", backend="nltk")        # NLTK (== numpy with definition="nltk")

The libraries are imported inside the methods, when a backend is used.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.core.interfaces import Metric
from llmtune.core.results import LazyMapping, MetricResult
from llmtune.metrics._bootstrap import bootstrap_intervals
from llmtune.metrics._inputs import check_corpus
from llmtune.metrics.bleu import (
    BleuOptions,
    NltkBleuOptions,
    bleu_signature,
    result_keys,
    warn_zero_orders,
)
from llmtune.metrics.rouge import RougeOptions, rouge_signature

#: NLTK method0's warning text (one per n-gram order without matches).
_ZERO_ORDER = re.compile(r"contains 0 counts of (\d+)-gram overlaps")


def _nrefs(refs: list[list[str]]) -> str:
    counts = {len(g) for g in refs}
    return str(counts.pop()) if len(counts) == 1 else "var"


class RougeScoreRouge(Metric):
    """rouge-score's ``RougeScorer``: ``score`` for one reference, ``score_multi`` for several; corpus = mean."""

    name: ClassVar[str] = "rouge"
    backend: ClassVar[str] = "rouge-score"
    Options: ClassVar[type] = RougeOptions
    options: RougeOptions

    def compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> MetricResult:
        """Per-example P/R/F from rouge-score; corpus values are their plain means (no bootstrap median)."""
        from rouge_score import rouge_scorer

        preds, refs = check_corpus(predictions, references, "ROUGE")
        opts = self.options
        types = list(opts.rouge_types)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=opts.use_stemmer)
        rows = [scorer.score(group[0], pred) if len(group) == 1 else scorer.score_multi(group, pred)
                for pred, group in zip(preds, refs)]
        per_example: dict[str, np.ndarray] = {}
        for t in types:
            for measure in ("precision", "recall", "fmeasure"):
                per_example[f"{t}_{measure}"] = np.array([float(getattr(row[t], measure)) for row in rows],
                                                         dtype=np.float64)
        scores = {key: float(np.mean(values)) for key, values in per_example.items()}
        if opts.bootstrap:
            scores.update(bootstrap_intervals(per_example, samples=opts.bootstrap_samples,
                                              confidence=float(opts.confidence), seed=opts.seed))
        return MetricResult(scores=scores, per_example=per_example,
                            signature=rouge_signature(opts, _nrefs(refs), f"rouge-score-{_version('rouge-score')}"))


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover - importable but not installed as a distribution
        return "unknown"


@contextmanager
def _quiet_sacrebleu() -> Iterator[None]:
    """Silence sacrebleu's per-call logger warnings (e.g. the effective_order advice on every sentence)."""
    logger = logging.getLogger("sacrebleu")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class SacreBleu(Metric):
    """``sacrebleu.metrics.BLEU(**options)``: ``corpus_score`` for the corpus, ``sentence_score`` per example."""

    name: ClassVar[str] = "bleu"
    backend: ClassVar[str] = "sacrebleu"
    Options: ClassVar[type] = BleuOptions
    options: BleuOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.definition != "sacrebleu":
            raise InvalidOptionError(
                f"{self.describe()} computes definition='sacrebleu' only; for NLTK's BLEU use backend='nltk' "
                "(or backend='numpy' with definition='nltk')"
            )

    def compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> MetricResult:
        """sacrebleu's numbers with our keys; references are transposed into sacrebleu's streams (None-padded)."""
        import sacrebleu
        from sacrebleu.metrics import BLEU

        preds, refs = check_corpus(predictions, references, "BLEU")
        opts = self.options
        kwargs = opts.sacrebleu_kwargs()
        width = max(len(g) for g in refs)
        streams = [[g[k] if k < len(g) else None for g in refs] for k in range(width)]
        with _quiet_sacrebleu():
            res = BLEU(**kwargs).corpus_score(preds, streams)  # type: ignore[arg-type]  # None = no reference
        scores: dict[str, float] = {"bleu": res.score, "bp": res.bp, "sys_len": res.sys_len, "ref_len": res.ref_len}
        scores.update({f"precision_{n}": p for n, p in enumerate(res.precisions, start=1)})
        assert list(scores) == result_keys(opts)

        def sentences() -> dict[str, np.ndarray]:
            metric = BLEU(**kwargs)
            with _quiet_sacrebleu():
                values = [metric.sentence_score(p, g).score for p, g in zip(preds, refs)]
            return {"bleu": np.array(values, dtype=np.float64)}

        sig = bleu_signature(opts, [len(g) for g in refs], f"sacrebleu-{sacrebleu.__version__}",
                             version=sacrebleu.__version__)
        return MetricResult(scores=scores, per_example=LazyMapping(["bleu"], sentences), signature=sig)


class NltkBleu(Metric):
    """NLTK's ``corpus_bleu`` / ``sentence_bleu`` on whitespace tokens with ``SmoothingFunction().methodK``."""

    name: ClassVar[str] = "bleu"
    backend: ClassVar[str] = "nltk"
    Options: ClassVar[type] = NltkBleuOptions
    options: NltkBleuOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.definition != "nltk":
            raise InvalidOptionError(
                f"{self.describe()} computes definition='nltk' only; for sacrebleu's BLEU use backend='sacrebleu' "
                "(or the default backend='numpy')"
            )

    def compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> MetricResult:
        """NLTK's numbers (0-1) with our keys; NLTK's assert in smoothing method 6 becomes a ValueError / NaN."""
        import nltk
        from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

        preds, refs = check_corpus(predictions, references, "BLEU")
        opts = self.options
        hyps = [p.split() for p in preds]
        ref_toks = [[r.split() for r in g] for g in refs]
        kwargs = {"weights": opts.nltk_weights,
                  "smoothing_function": getattr(SmoothingFunction(), f"method{opts.smoothing or 0}"),
                  "auto_reweigh": bool(opts.auto_reweigh)}

        with warnings.catch_warnings(record=True) as caught:  # NLTK warns per zero order; we warn once
            warnings.simplefilter("always")
            try:
                corpus = float(corpus_bleu(ref_toks, hyps, **kwargs))
            except (AssertionError, IndexError) as exc:
                if opts.smoothing != 6:
                    raise
                raise ValueError(
                    "corpus BLEU: NLTK smoothing method 6 needs at least 3 weights and a non-zero trigram precision "
                    f"(NLTK raises {type(exc).__name__} here)"
                ) from None
        found = (_ZERO_ORDER.search(str(w.message)) for w in caught)
        warn_zero_orders(sorted({int(m[1]) for m in found if m}))

        def sentences() -> dict[str, np.ndarray]:
            values = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for r, h in zip(ref_toks, hyps):
                    try:
                        values.append(float(sentence_bleu(r, h, **kwargs)))
                    except (AssertionError, IndexError):
                        if opts.smoothing != 6:
                            raise
                        values.append(math.nan)
            return {"bleu": np.array(values, dtype=np.float64)}

        sig = bleu_signature(opts, [len(g) for g in refs], f"nltk-{nltk.__version__}", version=nltk.__version__)
        return MetricResult(scores={"bleu": corpus}, per_example=LazyMapping(["bleu"], sentences), signature=sig)
