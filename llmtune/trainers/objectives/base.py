"""The `Objective` interface and the two data shapes the loop consumes (`TrainData`, `EvalData`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from llmtune.data import Example
    from llmtune.trainers.backend import BackendContext, TrainerBackend


class TrainData:
    """Training examples as the loop reads them: the global batch of any step, computed from the step alone."""

    #: examples in one pass (None when not known without a full pass)
    num_examples: int | None = None

    def fingerprint(self) -> str:
        raise NotImplementedError

    def step_examples(self, step: int, global_batch: int) -> list[Example]:
        """The ``global_batch`` examples of optimizer step ``step`` (0-based), the same on every process."""
        raise NotImplementedError


class ExampleData(TrainData):
    """A list of examples in a fresh seeded permutation each epoch (the same order on every process)."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        self.examples = list(examples)
        self.seed = seed
        self.num_examples = len(self.examples)
        self._order: tuple[int, list[int]] | None = None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.examples:
            h.update(json.dumps([list(ex.input_ids), list(ex.labels)]).encode())
        return h.hexdigest()[:16]

    def order(self, epoch: int) -> list[int]:
        """The data order of ``epoch``: a permutation drawn from its own generator (seed, epoch)."""
        import torch

        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.examples), generator=g).tolist())
        return self._order[1]

    def step_examples(self, step: int, global_batch: int) -> list[Example]:
        per_epoch = len(self.examples) // global_batch
        epoch, k = divmod(step, per_epoch)
        chunk = self.order(epoch)[k * global_batch:(k + 1) * global_batch]
        return [self.examples[i] for i in chunk]


@dataclasses.dataclass
class EvalData:
    """Held-out data: examples for the validation loss, and (prompt ids, references) for generation."""

    examples: list[Example] = dataclasses.field(default_factory=list)
    prompts: list[list[int]] = dataclasses.field(default_factory=list)
    references: list[str] = dataclasses.field(default_factory=list)


class Objective:
    """What is optimised: how training/eval data become examples, and the loss of a batch."""

    name: ClassVar[str] = ""
    #: the options dataclass of trainers with this objective
    Options: ClassVar[type] = dataclasses.make_dataclass("NoObjectiveOptions", [])

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> TrainData:
        raise NotImplementedError

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        raise NotImplementedError

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        from llmtune.data import collate

        return collate(examples, pad_id)

    def scored_tokens(self, example: Example) -> int:
        """Tokens the loss scores in one example (labels shifted by one, -100 ignored)."""
        return sum(1 for t in example.labels[1:] if t != -100)

    def loss(self, backend: TrainerBackend, model: Any, batch: Mapping[str, torch.Tensor],
             ctx: BackendContext) -> torch.Tensor:
        """SUM of the per-token losses of ``batch`` (the loop divides by the global token count)."""
        return backend.loss(model, batch, ctx)
