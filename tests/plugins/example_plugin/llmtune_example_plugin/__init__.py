"""An example llmtune plugin: two metrics, registered through entry points, using only the public API."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

import llmtune
from llmtune.metrics import CorpusMetric, check_corpus, nrefs_field


class ExactMatch(CorpusMetric):
    """Share of predictions equal to one of their references (after optional stripping/lowercasing).

    Built on llmtune's metric template: `CorpusMetric.compute` checks the inputs (lengths, types, empty
    corpus: errors that name the index), calls `extract`, averages, and adds the ``nrefs`` field.
    """

    name = "exact_match"
    backend = "example"
    label = "exact match"

    @dataclasses.dataclass(frozen=True)
    class Options:
        ignore_case: bool = False
        strip: bool = True

        def __post_init__(self) -> None:
            for field in ("ignore_case", "strip"):
                if not isinstance(getattr(self, field), bool):
                    raise llmtune.InvalidOptionError(f"option {field} must be a bool")

    def _norm(self, text: str) -> str:
        text = text.strip() if self.options.strip else text
        return text.lower() if self.options.ignore_case else text

    def extract(self, preds: list[str], refs: list[list[str]]) -> dict[str, np.ndarray]:
        hits = [float(any(self._norm(p) == self._norm(r) for r in group)) for p, group in zip(preds, refs, strict=True)]
        return {"exact_match": np.asarray(hits, dtype=np.float64)}

    def signature(self, nrefs: str) -> str:
        return f"exact_match|nrefs:{nrefs}|case:{'lc' if self.options.ignore_case else 'mixed'}|strip:{self.options.strip}"


class LengthRatio(llmtune.Metric):
    """Mean ratio of prediction length to first-reference length, in whitespace tokens.

    Written against the bare `llmtune.Metric` interface, with llmtune's exported input checks
    (`check_corpus`: a length mismatch is an error, never a silent truncation).
    """

    name = "length_ratio"
    backend = "example"

    def compute(self, predictions: Sequence[str], references: Sequence[Any]) -> llmtune.MetricResult:
        preds, refs = check_corpus(predictions, references, "length ratio")
        ratios = [len(p.split()) / max(1, len(group[0].split())) for p, group in zip(preds, refs, strict=True)]
        values = np.asarray(ratios, dtype=np.float64)
        return llmtune.MetricResult({"length_ratio": float(values.mean())}, {"length_ratio": values},
                                    f"length_ratio|nrefs:{nrefs_field(refs)}|tok:whitespace")


def register(registry: Any) -> None:
    """Entry-point hook form: declare backends on the registry handed in."""
    registry.register_class(LengthRatio, source="plugin llmtune-example-plugin")
