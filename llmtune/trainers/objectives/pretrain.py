"""Objective ``pretrain``: self-supervised next-token training on raw text, streamed and packed into blocks.

Blocks are read in corpus order (no shuffling: the stream is never held in memory), cyclically: step ``k``
takes blocks ``k*B .. (k+1)*B - 1`` of the endless repetition of the corpus (``B`` = global batch), so a
step's data is a function of the step alone (exact resume; every process takes its share).
"""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.core.errors import ConfigError
from llmtune.trainers.objectives.base import EvalData, Objective, TrainData
from llmtune.trainers.options import PretrainOptions


class StreamData(TrainData):
    """The blocks of a `BlockStream` (or the examples of a streamed `llmtune.data.sources.ExampleStream`), read
    forward; a step behind the read position restarts the stream."""

    def __init__(self, stream: Any, *, count: bool) -> None:
        self.stream = stream
        self.num_examples = stream.count() if count else None
        self._it: Any = None
        self._pos = 0          # index (in the endless repetition) of the next block `_it` yields
        self._fingerprint: str | None = None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.stream.fingerprint()
        return self._fingerprint

    def _next_block(self) -> list[int]:
        if self._it is not None:
            block = next(self._it, None)
            if block is not None:
                self._pos += 1
                return block
        self._it = iter(self.stream)          # (re)start a pass over the corpus
        block = next(self._it, None)
        if block is None:
            raise ConfigError(getattr(self.stream, "empty", None)
                              or f"data: the text gives fewer than {self.stream.block_size} tokens (one block)")
        self._pos += 1
        return block

    def step_examples(self, step: int, global_batch: int) -> list[Any]:
        from llmtune.data import Example

        want = step * global_batch
        if self.num_examples:
            want_in_pass = want % self.num_examples
            if self._pos % self.num_examples != want_in_pass or self._it is None:
                self._it, self._pos = None, 0
                for _ in range(want_in_pass):
                    self._next_block()
        elif self._pos != want:
            self._it, self._pos = None, 0
            for _ in range(want):
                self._next_block()
        blocks = [self._next_block() for _ in range(global_batch)]
        return [b if isinstance(b, Example) else Example(b, list(b)) for b in blocks]


class Pretrain(Objective):
    """Next-token cross-entropy on every token of fixed-length blocks of raw text."""

    name: ClassVar[str] = "pretrain"
    Options: ClassVar[type] = PretrainOptions

    def _stream(self, data: Any, tokenizer: Any, options: Any, what: str) -> Any:
        from llmtune.data import BlockStream, text_sources

        return BlockStream(text_sources(data, what), tokenizer, block_size=options.max_length,
                           chunk_bytes=options.chunk_bytes, text_field=options.text_field)

    def data_digest(self, data: Any) -> str:
        """The text files' digest (by content, streamed); a missing or unusable source is named first."""
        from llmtune.data import text_sources

        sources = text_sources(data, "data")
        if any(s.dataset is not None for s in sources):   # dataset sources: their identity, not a full read
            from llmtune.data.sources import DataSpec

            return DataSpec(tuple(s.dataset for s in sources)).digest()
        return super().data_digest([s.path if s.path is not None else list(s.texts) for s in sources])

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> StreamData:
        # without max_steps the epoch length is needed: one counting pass over the stream
        return StreamData(self._stream(data, tokenizer, options, "data"), count=options.max_steps is None)

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        from llmtune.data import Example

        examples = []
        for block in self._stream(data, tokenizer, options, "eval_data"):
            examples.append(Example(block, list(block)))
            if options.eval_examples and len(examples) >= options.eval_examples:
                break
        if not examples:
            raise ConfigError(f"eval_data: the text gives fewer than {options.max_length} tokens (one block)")
        return EvalData(examples=examples)
