"""The interfaces a backend implements: `Metric`, `Quantizer`, `Trainer`, `Task`.

A backend is a subclass with class attributes ``name`` (what it computes, e.g. ``"rouge"``) and
``backend`` (how, e.g. ``"numpy"``), a frozen dataclass ``Options`` for its keyword options, and the
one or three methods of its interface. Everything else (registration, option checking, error
messages) is done here and in `llmtune.core.registry`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from llmtune.core.options import NoOptions, build_options
from llmtune.core.results import MetricResult, TaskResult, TrainResult

#: ``progress(step, done, total)``: how a long library call reports each finished step (e.g. a decoder block)
#: to its caller, which renders it (the CLI draws a bar); the library itself prints nothing.
ProgressFn = Callable[[str, int, int], None]


class Backend(abc.ABC):  # noqa: B024 - abstract through its three subclasses
    """Common base: identity, typed options and an availability check."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    #: The options dataclass; keyword arguments to the constructor are checked against it.
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        self.options: Any = build_options(self.Options, options, where=self.describe())

    @classmethod
    def describe(cls) -> str:
        """Human name used in messages, e.g. ``metric 'rouge' (backend 'numpy')``."""
        return f"{cls.kind} {cls.name!r} (backend {cls.backend!r})"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None. Must be cheap: no heavy imports."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind}={self.name!r} backend={self.backend!r} {self.options!r}>"


class Metric(Backend):
    """Scores predictions against references."""

    kind: ClassVar[str] = "metric"

    @abc.abstractmethod
    def compute(
        self,
        predictions: Sequence[str],
        references: Sequence[str] | Sequence[Sequence[str]],
    ) -> MetricResult:
        """Score ``predictions`` (one string each) against ``references`` (one or several each)."""


class Quantizer(Backend):
    """Turns a torch model into a quantized one with the same forward, and saves/loads it."""

    kind: ClassVar[str] = "quantizer"
    #: True when a LoRA adapter can be trained on top of the quantized layers (QLoRA-style).
    trainable: ClassVar[bool] = False

    @abc.abstractmethod
    def quantize(self, model: Any, calibration: Iterable[Any] | None = None, *,
                 progress: ProgressFn | None = None) -> Any:
        """Quantize ``model`` (a ``torch.nn.Module``); returns the module with the same forward.

        ``progress``, when given, is called after each step (`ProgressFn`).
        """

    @abc.abstractmethod
    def save(self, model: Any, path: str | Path) -> Path:
        """Write a quantized model to ``path`` (safetensors); returns the directory."""

    @abc.abstractmethod
    def load(self, path: str | Path, **kwargs: Any) -> Any:
        """Read back what `save` wrote; the outputs are identical to the saved model's."""

    def hf_quantization_config(self) -> Any | None:
        """The transformers ``quantization_config`` for load-time quantization, if the backend has one."""
        return None


class Trainer(Backend):
    """Fine-tunes a model on data and returns where the result went and how it scored."""

    kind: ClassVar[str] = "trainer"

    @abc.abstractmethod
    def train(self, model: Any, data: Any, **kwargs: Any) -> TrainResult:
        """Train on ``data`` starting from ``model`` (a local path, hub id or ``nn.Module``)."""


class Task(Backend):
    """A benchmark: local data plus a scoring rule, run on a model through a scoring interface."""

    kind: ClassVar[str] = "task"

    @abc.abstractmethod
    def evaluate(self, model: Any, tokenizer: Any = None, **kwargs: Any) -> TaskResult:
        """Score ``model`` (an ``nn.Module`` with ``tokenizer``, or a scorer) on this task's items."""

    def check_data(self) -> None:
        """Read and check the task's data files without a model (an error names the bad row); `evaluate` calls it
        for every task before the model loads."""


class Reward(Backend):
    """A reward function for online RL: one float per completion (higher is better).

    Called with the prompts (one per completion, rendered text), the completions (decoded text) and the
    training record's other fields as keyword arguments (one value per completion, e.g. ``answer=[...]``), as
    TRL's ``GRPOTrainer`` calls its reward functions. ``None`` for a completion means "does not apply" (it counts
    0 in a weighted sum and is left out of this function's statistics).
    """

    kind: ClassVar[str] = "reward"

    @abc.abstractmethod
    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **fields: Sequence[Any]) -> list[float | None]:
        """One reward per completion."""


KINDS: dict[str, type[Backend]] = {"metric": Metric, "quantizer": Quantizer, "trainer": Trainer, "task": Task}
KINDS["reward"] = Reward
