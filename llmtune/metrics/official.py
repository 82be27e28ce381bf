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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from llmtune.core.errors import InvalidOptionError
from llmtune.core.results import LazyMapping
from llmtune.core.versions import installed_version
from llmtune.metrics.bleu import (
    BleuTemplate,
    NltkBleuOptions,
    result_keys,
    warn_method6,
    warn_zero_orders,
)
from llmtune.metrics.chrf import ChrfTemplate
from llmtune.metrics.rouge import RougeTemplate
from llmtune.metrics.ter import TerTemplate

#: NLTK method0's warning text (one per n-gram order without matches).
_ZERO_ORDER = re.compile(r"contains 0 counts of (\d+)-gram overlaps")


class RougeScoreRouge(RougeTemplate):
    """rouge-score's ``RougeScorer``: ``score`` for one reference, ``score_multi`` for several; corpus = mean."""

    backend: ClassVar[str] = "rouge-score"

    def extract(self, preds: list[str], refs: list[list[str]]) -> dict[str, np.ndarray]:
        """Per-example P/R/F from rouge-score (corpus values: their plain means, no bootstrap median)."""
        from rouge_score import rouge_scorer

        types = list(self.options.rouge_types)
        scorer = rouge_scorer.RougeScorer(types, use_stemmer=self.options.use_stemmer)
        rows = [scorer.score(group[0], pred) if len(group) == 1 else scorer.score_multi(group, pred)
                for pred, group in zip(preds, refs, strict=True)]
        return {f"{t}_{measure}": np.array([float(getattr(row[t], measure)) for row in rows], dtype=np.float64)
                for t in types for measure in ("precision", "recall", "fmeasure")}

    def implementation(self) -> str:
        """``rouge-score-<installed version>``."""
        return f"rouge-score-{_version('rouge-score')}"


def _version(dist: str) -> str:
    """The installed version of ``dist`` for a signature; "unknown" if importable but not installed."""
    return installed_version(dist) or "unknown"


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


class SacreBleu(BleuTemplate):
    """``sacrebleu.metrics.BLEU(**options)``: ``corpus_score`` for the corpus, ``sentence_score`` per example."""

    backend: ClassVar[str] = "sacrebleu"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.definition != "sacrebleu":
            raise InvalidOptionError(
                f"{self.describe()} computes definition='sacrebleu' only; for NLTK's BLEU use backend='nltk' "
                "(or backend='numpy' with definition='nltk')"
            )

    def implementation(self) -> tuple[str, str | None]:
        """sacrebleu itself, at the installed version."""
        import sacrebleu

        return f"sacrebleu-{sacrebleu.__version__}", sacrebleu.__version__

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """sacrebleu's numbers with our keys; references are transposed into sacrebleu's streams (None-padded)."""
        from sacrebleu.metrics import BLEU

        opts = self.options
        kwargs = opts.sacrebleu_kwargs()
        with _quiet_sacrebleu():
            res = BLEU(**kwargs).corpus_score(preds, _streams(refs))  # type: ignore[arg-type]  # None = no reference
        scores: dict[str, float] = {"bleu": res.score, "bp": res.bp, "sys_len": res.sys_len, "ref_len": res.ref_len}
        scores.update({f"precision_{n}": p for n, p in enumerate(res.precisions, start=1)})
        assert list(scores) == result_keys(opts)

        def sentences() -> dict[str, np.ndarray]:
            metric = BLEU(**kwargs)
            with _quiet_sacrebleu():
                values = [metric.sentence_score(p, g).score for p, g in zip(preds, refs, strict=True)]
            return {"bleu": np.array(values, dtype=np.float64)}

        return scores, LazyMapping(["bleu"], sentences)


class NltkBleu(BleuTemplate):
    """NLTK's ``corpus_bleu`` / ``sentence_bleu`` on whitespace tokens with ``SmoothingFunction().methodK``."""

    backend: ClassVar[str] = "nltk"
    Options: ClassVar[type] = NltkBleuOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.definition != "nltk":
            raise InvalidOptionError(
                f"{self.describe()} computes definition='nltk' only; for sacrebleu's BLEU use backend='sacrebleu' "
                "(or the default backend='numpy')"
            )

    def implementation(self) -> tuple[str, str | None]:
        """NLTK itself, at the installed version."""
        import nltk

        return f"nltk-{nltk.__version__}", nltk.__version__

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """NLTK's numbers (0-1) with our keys; where NLTK's method 6 fails its assert the value is NaN."""
        from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu

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
                corpus, failure = math.nan, type(exc).__name__
            else:
                failure = ""
        if failure:
            warn_method6("NLTK smoothing method 6 needs at least 3 weights and a non-zero trigram precision "
                         f"(NLTK raises {failure} here)")
        found = (_ZERO_ORDER.search(str(w.message)) for w in caught)
        warn_zero_orders(sorted({int(m[1]) for m in found if m}))

        def sentences() -> dict[str, np.ndarray]:
            values = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for r, h in zip(ref_toks, hyps, strict=True):
                    try:
                        values.append(float(sentence_bleu(r, h, **kwargs)))
                    except (AssertionError, IndexError):
                        if opts.smoothing != 6:
                            raise
                        values.append(math.nan)
            return {"bleu": np.array(values, dtype=np.float64)}

        return {"bleu": corpus}, LazyMapping(["bleu"], sentences)


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-prediction reference lists as sacrebleu's streams, None-padded where a prediction has fewer."""
    width = max(len(g) for g in refs)
    return [[g[k] if k < len(g) else None for g in refs] for k in range(width)]


class SacreChrf(ChrfTemplate):
    """``sacrebleu.metrics.CHRF(**options)``: ``corpus_score`` for the corpus, ``sentence_score`` per example."""

    backend: ClassVar[str] = "sacrebleu"

    def implementation(self) -> tuple[str, str | None]:
        """sacrebleu itself, at the installed version."""
        import sacrebleu

        return f"sacrebleu-{sacrebleu.__version__}", sacrebleu.__version__

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """sacrebleu's corpus chrF and (lazily) its sentence chrF per prediction."""
        from sacrebleu.metrics import CHRF

        kwargs = self.options.sacrebleu_kwargs()
        corpus = CHRF(**kwargs).corpus_score(preds, _streams(refs)).score  # type: ignore[arg-type]

        def sentences() -> dict[str, np.ndarray]:
            metric = CHRF(**kwargs)
            return {"chrf": np.array([metric.sentence_score(p, g).score for p, g in zip(preds, refs, strict=True)])}

        return {"chrf": corpus}, LazyMapping(["chrf"], sentences)


class SacreTer(TerTemplate):
    """``sacrebleu.metrics.TER(**options)``: ``corpus_score`` for the corpus, ``sentence_score`` per example."""

    backend: ClassVar[str] = "sacrebleu"

    def implementation(self) -> tuple[str, str | None]:
        """sacrebleu itself, at the installed version."""
        import sacrebleu

        return f"sacrebleu-{sacrebleu.__version__}", sacrebleu.__version__

    def extract(self, preds: list[str], refs: list[list[str]]) -> tuple[dict[str, float], LazyMapping]:
        """sacrebleu's corpus TER and (lazily) its sentence TER per prediction."""
        from sacrebleu.metrics import TER

        kwargs = self.options.sacrebleu_kwargs()
        corpus = TER(**kwargs).corpus_score(preds, _streams(refs)).score  # type: ignore[arg-type]

        def sentences() -> dict[str, np.ndarray]:
            metric = TER(**kwargs)
            return {"ter": np.array([metric.sentence_score(p, g).score for p, g in zip(preds, refs, strict=True)])}

        return {"ter": corpus}, LazyMapping(["ter"], sentences)
