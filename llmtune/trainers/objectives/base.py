"""The `Objective` interface and the two data shapes the loop consumes (`TrainData`, `EvalData`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
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


def _file_digest(h: Any, path: Path) -> None:
    h.update(f"{path.name}|{path.stat().st_size}|".encode())
    with open(path, "rb") as fh:  # streamed: flat memory on a large corpus
        while block := fh.read(1 << 20):
            h.update(block)


def digest_into(h: Any, data: Any) -> None:
    """Feed ``data`` (paths, directories, records, texts, examples) into the hash ``h``, files by content."""
    if isinstance(data, (str, os.PathLike)) and not (isinstance(data, str) and "\n" in data) and _exists(data):
        path = Path(data)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            _file_digest(h, f)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        for item in data:
            if hasattr(item, "input_ids") and hasattr(item, "labels"):
                h.update(json.dumps([list(item.input_ids), list(item.labels)]).encode())
            elif isinstance(item, (str, os.PathLike)):
                digest_into(h, item)
            else:
                h.update(json.dumps(item, sort_keys=True, default=str).encode())
    else:
        h.update(str(data).encode())


def _exists(path: str | os.PathLike[str]) -> bool:
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


class Objective:
    """What is optimised: how training/eval data become examples, and the loss of a batch."""

    name: ClassVar[str] = ""
    #: whether ``packing=True`` means something here (several records per row, each attending only to itself)
    packs: ClassVar[bool] = False
    #: the options dataclass of trainers with this objective
    Options: ClassVar[type] = dataclasses.make_dataclass("NoObjectiveOptions", [])

    def data_digest(self, data: Any) -> str:
        """Identity of the raw training data (before the model or tokenizer load): the run fingerprint's."""
        h = hashlib.sha256()
        digest_into(h, data)
        return h.hexdigest()[:16]

    def check_data(self, data: Any, what: str) -> str:
        """Read and validate ``data`` as `train_data` will, without a tokenizer or torch (``train --check``);
        return what was seen, or raise naming the file, line and field. Default: the data are read (hashed)."""
        self.data_digest(data)
        return f"{data}: read by objective {self.name!r} (its records are validated when it tokenizes them)"

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> TrainData:
        raise NotImplementedError

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        raise NotImplementedError

    def setup(self, model: Any, state: Any) -> None:
        """Once per run, before the method applies: ``model`` is the run's starting model (also on resume:
        a checkpoint's weights load after this); ``state`` the loop's `RunState` (data, eval, tokenizer,
        accelerator). Objectives that need something of the starting model (DPO's precomputed reference
        log-probs) take it here. Default: nothing."""

    def collate(self, examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
        from llmtune.data import collate

        return collate(examples, pad_id)

    def scored_tokens(self, example: Example) -> int:
        """Tokens the loss scores in one example (labels shifted by one, -100 ignored)."""
        return example.num_trained

    def loss(self, backend: TrainerBackend, model: Any, batch: Mapping[str, torch.Tensor],
             ctx: BackendContext) -> torch.Tensor:
        """SUM of the per-token losses of ``batch`` (the loop divides by the global token count)."""
        return backend.loss(model, batch, ctx)

    def pop_metric_sums(self) -> tuple[float, dict[str, float]]:
        """This step's objective statistics (e.g. DPO margins) on this process, as (total weight, weighted sum of
        each statistic), then forget them. The loop adds both over processes and logs sum / weight, so a
        statistic in ``log.jsonl`` is the whole global batch's. Default: none."""
        return 0.0, {}
