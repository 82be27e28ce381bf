"""Objective ``sft``: supervised fine-tuning on instruction/chat/text records (loss on the answers)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

from llmtune.core.errors import ConfigError
from llmtune.data.formats import detect_format
from llmtune.data.records import Records
from llmtune.trainers.objectives.base import EvalData, ExampleData, Objective, TrainData
from llmtune.trainers.options import TrainOptions


def load_records(data: Any, what: str, seed: int = 0) -> list[dict[str, Any]]:
    """Records from a path (.jsonl/.json/.csv), a dataset source or mixture (`llmtune.data.sources`, mixed by
    ``seed``), or a list of dicts."""
    from llmtune.data import load_records as load
    from llmtune.data.sources import as_spec

    spec = as_spec(data, seed)
    if spec is not None:
        mixed = spec.records(what)
        for i, record in enumerate(mixed):
            detect_format(record, mixed.where(i))
        return mixed
    if isinstance(data, (str, os.PathLike)):
        return load(Path(data))
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        records = list(data)
        for i, r in enumerate(records):
            if not isinstance(r, Mapping):
                raise ConfigError(f"{what}[{i}] is a {type(r).__name__}, not a record (dict)")
        return [dict(r) for r in records]
    raise ConfigError(f"{what} must be a path to .jsonl/.json/.csv, a list of records or of pre-tokenized "
                      f"examples, not {type(data).__name__}")


def _turn_options(options: Any) -> dict[str, Any]:
    """Which turns are learned (``train_on``) and the default system prompt, for `build_examples`."""
    return {"train_on": getattr(options, "train_on", "assistant"),
            "system_prompt": getattr(options, "system_prompt", None)}


class Sft(Objective):
    """Next-token loss on the answer tokens of templated records (or on pre-tokenized examples' labels)."""

    packs = True

    name: ClassVar[str] = "sft"
    Options: ClassVar[type] = TrainOptions

    def data_digest(self, data: Any) -> str:
        """The records' digest; reading them here names a bad data file before anything is written."""
        import hashlib
        import json

        from llmtune.data import is_tokenized

        if is_tokenized(data):
            return super().data_digest(data)
        from llmtune.data.sources import as_spec

        spec = as_spec(data)
        if spec is not None and spec.streaming:   # not read in full: the sources' identity (files by size, ends)
            return spec.digest()
        records = load_records(data, "data")
        return hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _examples(self, data: Any, tokenizer: Any, options: Any, what: str) -> list[Any]:
        from llmtune.data import is_tokenized, pack_examples, tokenized_examples

        if is_tokenized(data):
            examples = tokenized_examples(data, source=what)
        else:
            from llmtune.data.sources import as_spec

            build = self._builder(tokenizer, options, what)
            records = load_records(data, what, options.seed)
            spec = as_spec(data, options.seed)
            examples = spec.examples(cast(Records, records), build) if spec is not None else build(records, {})
        if options.packing:
            examples = pack_examples(examples, options.max_length)
        return list(examples)

    def _builder(self, tokenizer: Any, options: Any, what: str) -> Any:
        """``build(records, overrides)``: examples of records, a source's template options over the trainer's."""
        from llmtune.data import build_examples

        def build(records: Any, overrides: dict[str, str]) -> list[Any]:
            return build_examples(records, tokenizer, max_length=options.max_length,
                                  train_on_prompt=options.train_on_prompt, source=what,
                                  **{"template": options.template, **_turn_options(options), **overrides})

        return build

    def train_data(self, data: Any, tokenizer: Any, options: Any) -> TrainData:
        from llmtune.data.sources import ExampleStream, as_spec

        spec = as_spec(data, options.seed)
        if spec is not None and spec.streaming:   # examples built as the stream is read, in stream order
            from llmtune.trainers.objectives.pretrain import StreamData

            if options.packing:
                raise ConfigError("data: packing needs the whole data; it does not work with streaming: true")
            stream = ExampleStream(spec, self._builder(tokenizer, options, "data"))
            return StreamData(stream, count=options.max_steps is None)
        examples = self._examples(data, tokenizer, options, "data")
        if not examples:
            raise ConfigError("data: no training examples")
        return ExampleData(examples, options.seed)

    def eval_data(self, data: Any, tokenizer: Any, options: Any) -> EvalData:
        from llmtune.data import build_examples, is_tokenized, render_prompt, tokenized_examples

        n = options.eval_examples
        if is_tokenized(data):
            examples = tokenized_examples(data, source="eval_data")
            return EvalData(examples=examples if n == 0 else examples[:n])
        records = load_records(data, "eval_data", options.seed)
        chosen = records if n == 0 else records[:n]
        prompts, refs = [], []
        for rec in chosen:
            prompt, answer = render_prompt(rec, options.template, tokenizer,
                                           system_prompt=getattr(options, "system_prompt", None))
            prompts.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
            refs.append(answer.strip())
        examples = build_examples(chosen, tokenizer, template=options.template, max_length=options.max_length,
                                  train_on_prompt=options.train_on_prompt, source="eval_data", **_turn_options(options))
        return EvalData(examples=list(examples), prompts=prompts, references=refs)
