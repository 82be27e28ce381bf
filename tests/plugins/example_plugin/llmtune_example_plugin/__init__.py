"""An example llmtune plugin: two metrics, registered through entry points, using only the public API."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

import llmtune


class ExactMatch(llmtune.Metric):
    """Share of predictions equal to one of their references (after optional stripping/lowercasing)."""

    name = "exact_match"
    backend = "example"

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

    def compute(self, predictions: Sequence[str], references: Sequence[Any]) -> llmtune.MetricResult:
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
        hits = []
        for pred, refs in zip(predictions, references):
            group = [refs] if isinstance(refs, str) else list(refs)
            hits.append(float(any(self._norm(pred) == self._norm(r) for r in group)))
        values = np.asarray(hits, dtype=np.float64)
        return llmtune.MetricResult(
            scores={"exact_match": float(values.mean()) if len(values) else 0.0},
            per_example={"exact_match": values},
            signature=f"exact_match|case:{'lc' if self.options.ignore_case else 'mixed'}|strip:{self.options.strip}",
        )


class LengthRatio(llmtune.Metric):
    """Mean ratio of prediction length to first-reference length, in whitespace tokens."""

    name = "length_ratio"
    backend = "example"

    def compute(self, predictions: Sequence[str], references: Sequence[Any]) -> llmtune.MetricResult:
        ratios = []
        for pred, refs in zip(predictions, references):
            ref = refs if isinstance(refs, str) else refs[0]
            ratios.append(len(pred.split()) / max(1, len(ref.split())))
        values = np.asarray(ratios, dtype=np.float64)
        return llmtune.MetricResult({"length_ratio": float(values.mean()) if len(values) else 0.0},
                                    {"length_ratio": values}, "length_ratio|tok:whitespace")


def register(registry: Any) -> None:
    """Entry-point hook form: declare backends on the registry handed in."""
    registry.register_class(LengthRatio, source="plugin llmtune-example-plugin")
