"""The metric template (sacrebleu's ``Metric`` shape): check inputs -> extract statistics -> aggregate.

A backend subclasses `CorpusMetric` and writes only what differs::

    class MyMetric(CorpusMetric):
        name, backend, label = "my_metric", "numpy", "MyMetric"

        def extract(self, preds, refs):            # after the input checks: lists of str / lists of lists
            return {"my_metric": np.array([...])}  # per-example values (or any statistics object)

        def signature(self, nrefs):
            return f"my_metric|nrefs:{nrefs}"

`compute` runs the input checks (`llmtune.metrics.check_corpus`: lengths, types, empty corpus), `extract`,
`aggregate` (default: the corpus value of each key is the mean of its per-example values), the seeded
bootstrap intervals when the options ask for them (``bootstrap=True``: ``bootstrap_samples``,
``confidence``, ``seed``), and hands `signature` the ``nrefs`` field. BLEU-like metrics whose corpus score
is not a mean override `aggregate`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from llmtune.core.interfaces import Metric
from llmtune.core.results import MetricResult
from llmtune.metrics._bootstrap import bootstrap_intervals
from llmtune.metrics._inputs import InputError, check_corpus, nrefs_field

__all__ = ["CorpusMetric"]


class CorpusMetric(Metric):
    """Template for a corpus metric; subclasses implement `extract` and `signature` (and maybe `aggregate`)."""

    #: Name used in input-error messages, e.g. "ROUGE".
    label: ClassVar[str] = ""

    def compute(self, predictions: Iterable[str], references: Iterable[Any]) -> MetricResult:  # type: ignore[override]
        """Score each prediction against its reference(s): checks, `extract`, `aggregate`, bootstrap, signature."""
        preds, refs = check_corpus(predictions, references, self.label or self.name)
        stats = self.extract(preds, refs)
        scores, per_example = self.aggregate(stats, preds, refs)
        if getattr(self.options, "bootstrap", False):
            scores = {**scores, **self.intervals(per_example)}
        return MetricResult(scores=scores, per_example=per_example, signature=self.signature(nrefs_field(refs)))

    def extract(self, preds: list[str], refs: list[list[str]]) -> Any:
        """Sufficient statistics of the checked inputs (default template: per-example arrays by key)."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract()")

    def aggregate(self, stats: Any, preds: list[str], refs: list[list[str]],
                  ) -> tuple[dict[str, float], Mapping[str, np.ndarray]]:
        """``(scores, per_example)`` from the statistics: by default the mean of each per-example array."""
        per_example: Mapping[str, np.ndarray] = stats
        return {key: float(np.mean(values)) for key, values in per_example.items()}, per_example

    def intervals(self, per_example: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Seeded percentile intervals ``{key}_low``/``{key}_high`` of the corpus mean (needs >= 2 examples)."""
        n = len(next(iter(per_example.values()))) if per_example else 0
        if n < 2:
            raise InputError(f"{self.describe()}: bootstrap=True cannot give a confidence interval from {n} "
                             "example (resampling one value always gives it back); score at least 2")
        opts = self.options
        return bootstrap_intervals(per_example, samples=opts.bootstrap_samples, confidence=float(opts.confidence),
                                   seed=opts.seed)

    def signature(self, nrefs: str) -> str:
        """How to reproduce the number; ``nrefs`` is the references-per-prediction field (``"1"``, ``"var"``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement signature()")
