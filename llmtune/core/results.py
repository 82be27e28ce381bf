"""Result types returned by the three interfaces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy stays out of `import llmtune`
    import numpy as np


class LazyMapping(Mapping[str, "np.ndarray"]):
    """A mapping whose values are computed on first access, all at once, then cached.

    Metrics use it for ``per_example`` so that a corpus score does not pay for per-example values
    nobody reads.
    """

    def __init__(self, keys: list[str], compute: Callable[[], Mapping[str, np.ndarray]]) -> None:
        self._keys = list(keys)
        self._compute: Callable[[], Mapping[str, np.ndarray]] | None = compute
        self._values: Mapping[str, np.ndarray] | None = None

    def _materialise(self) -> Mapping[str, np.ndarray]:
        if self._values is None:
            assert self._compute is not None
            self._values = dict(self._compute())
            self._compute = None
        return self._values

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._materialise()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        state = "computed" if self._values is not None else "lazy"
        return f"LazyMapping({self._keys!r}, {state})"


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """What `Metric.compute` returns.

    ``scores``: corpus-level values; ``per_example``: one value per prediction for each key (may be
    lazy); ``signature``: how to reproduce the number, sacrebleu-style.
    """

    scores: dict[str, float]
    per_example: Mapping[str, np.ndarray]
    signature: str

    def __getitem__(self, key: str) -> float:
        return self.scores[key]


@dataclasses.dataclass
class TrainResult:
    """What `Trainer.train` returns.

    ``adapter_dir``: where the adapter (PEFT format) was saved; ``history``: one dict per logged step;
    ``eval``: held-out metric scores, e.g. ``{"before": {...}, "after": {...}}``; ``model_dir``: where
    the trained weights went, whatever the method (the adapter directory, or the whole model for
    ``method="full"``, where ``adapter_dir`` is None).
    """

    adapter_dir: Path | None
    history: list[dict[str, Any]]
    eval: dict[str, dict[str, float]]
    output_dir: Path | None = None
    stopped_early: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_dir: Path | None = None


@dataclasses.dataclass
class TaskResult:
    """What `Task.evaluate` returns.

    ``metrics``: aggregate values (e.g. ``acc``, ``acc_norm``); ``stderr``: the standard error of each mean
    metric (sample standard deviation / sqrt(n), as lm-evaluation-harness reports it); ``per_item``: one dict
    per scored item (its id, prediction, per-item metric values, log-likelihoods); ``config``: how to reproduce
    it (task, backend, data file, number of shots, seed).
    """

    task: str
    backend: str
    metrics: dict[str, float]
    stderr: dict[str, float]
    n: int
    per_item: list[dict[str, Any]]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]
