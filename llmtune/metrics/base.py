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

from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise
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
    #: True when `extract` returns per-example arrays whose values do not depend on the other examples: then
    #: an ``n_jobs`` option > 1 splits the corpus into contiguous chunks scored in worker processes.
    chunkable: ClassVar[bool] = False

    def compute(self, predictions: Iterable[str], references: Iterable[Any]) -> MetricResult:  # type: ignore[override]
        """Score each prediction against its reference(s): checks, `extract`, `aggregate`, bootstrap, signature."""
        preds, refs = check_corpus(predictions, references, self.label or self.name)
        n_jobs = int(getattr(self.options, "n_jobs", 1))
        if self.chunkable and n_jobs > 1 and len(preds) > 1:
            stats: Any = self.extract_parallel(preds, refs, n_jobs)
        else:
            stats = self.extract(preds, refs)
        scores, per_example = self.aggregate(stats, preds, refs)
        if getattr(self.options, "bootstrap", False):
            scores = {**scores, **self.intervals(per_example)}
        return MetricResult(scores=scores, per_example=per_example, signature=self.signature(nrefs_field(refs)))

    def extract(self, preds: list[str], refs: list[list[str]]) -> Any:
        """Sufficient statistics of the checked inputs (default template: per-example arrays by key)."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract()")

    def extract_parallel(self, preds: list[str], refs: list[list[str]], n_jobs: int) -> dict[str, np.ndarray]:
        """`extract` on ``n_jobs`` contiguous chunks in worker processes, concatenated in order: the same
        per-example values as one call (they do not depend on the other examples), so the same result."""
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        bounds = np.linspace(0, len(preds), min(n_jobs, len(preds)) + 1).astype(int)
        chunks = [(preds[a:b], refs[a:b]) for a, b in pairwise(bounds.tolist()) if b > a]
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=len(chunks), mp_context=mp.get_context(method)) as pool:
            parts = list(pool.map(_extract_chunk, [self] * len(chunks), *zip(*chunks)))
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

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


class SignedCorpusMetric(CorpusMetric):
    """A `CorpusMetric` whose `extract` returns ``(scores, per_example)`` already (the corpus score is not a
    mean of per-example values) and whose signature is ``sign(options, nrefs, impl, version)``; backends
    that wrap another library override `implementation`."""

    #: ``(options, nrefs, impl, version) -> signature``, e.g. ``staticmethod(bleu_signature)``.
    sign: ClassVar[Callable[..., str]]

    def implementation(self) -> tuple[str, str | None]:
        """``(impl, version)`` for the signature: which code computed it, which library version it equals."""
        from llmtune._version import __version__

        return f"llmtune-numpy-{__version__}", None

    def aggregate(self, stats: Any, preds: list[str], refs: list[list[str]],
                  ) -> tuple[dict[str, float], Mapping[str, np.ndarray]]:
        """`extract` returns the corpus score and the (lazy) per-example scores already."""
        scores, per_example = stats
        return scores, per_example

    def signature(self, nrefs: str) -> str:
        """`sign` with this backend's implementation and version."""
        impl, version = self.implementation()
        return type(self).sign(self.options, nrefs, impl, version)


def _extract_chunk(metric: CorpusMetric, preds: list[str], refs: list[list[str]]) -> dict[str, np.ndarray]:
    """Worker-process entry point of `CorpusMetric.extract_parallel`."""
    return dict(metric.extract(preds, refs))
