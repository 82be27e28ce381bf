"""Tokenized training examples: labels -100 on the prompt, explicit truncation, optional packing, collation.

``labels`` are aligned with ``input_ids`` (the model shifts them, as Hugging Face causal LMs do): a position's
label is its own token when the loss is taken on it, else -100.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.data.records import as_records
from llmtune.data.templates import check_template, render_segments

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TRUNCATION = ("truncate", "error")
#: which tokens carry the loss: every assistant turn, only the last assistant turn, or every token
TRAIN_ON = ("assistant", "last_turn", "everything")


@dataclass
class Example:
    """One tokenized example: token ids and labels of the same length (-100 where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    where: str = field(default="", compare=False)
    #: a pack's example lengths, in order (None: not a pack). Each packed example attends only to itself.
    segments: list[int] | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and labels ({len(self.labels)}) differ in length")
        if self.segments is not None and (sum(self.segments) != len(self.input_ids) or min(self.segments) < 1):
            raise ValueError(f"segments {self.segments} do not add up to the {len(self.input_ids)} tokens")

    @property
    def position_ids(self) -> list[int]:
        """Positions, restarting at 0 at every packed example's first token."""
        return [i for n in (self.segments or [len(self.input_ids)]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """How many positions carry a label (the first position never does after the model's shift)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def _check_length(name: str, value: object) -> int:
    """A positive int option, or InvalidOptionError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise InvalidOptionError(f"option {name}={value!r} must be an int >= 2")
    return value


def build_examples(
    records: str | Path | Iterable[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    template: str = "llama3",
    max_length: int = 512,
    train_on_prompt: bool = False,
    source: str | None = None,
    truncation: str = "truncate",
    train_on: str = "assistant",
    system_prompt: str | None = None,
    date_string: str | None = None,
) -> list[Example]:
    """Render, tokenize and label records; loss only on answers unless `train_on_prompt`.

    ``train_on``: ``"assistant"`` (every assistant turn, the default), ``"last_turn"`` (only the final assistant
    turn: earlier answers are context) or ``"everything"`` (every token, as ``train_on_prompt=True``). Tool
    results are never answers. ``system_prompt``: the system turn of records that have none.
    ``date_string``: the ``Today Date`` of the ``llama3.1`` header (default: the template's own).

    Longer than `max_length`: ``truncation="truncate"`` (default) cuts from the end and warns with the count;
    an example whose answer is cut away entirely is then left out, and that count is in the warning too.
    ``truncation="error"`` raises `ConfigError` naming the record instead.
    """
    max_length = _check_length("max_length", max_length)
    check_choice("truncation", truncation, TRUNCATION)
    check_choice("train_on", train_on, TRAIN_ON)
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise InvalidOptionError(f"option system_prompt={system_prompt!r} must be a string")
    check_template(template, tokenizer)
    train_on_prompt = train_on_prompt or train_on == "everything"
    recs = as_records(records, source=source)
    extra = {"date_string": date_string} if date_string is not None else {}

    rendered: list[tuple[str, list[tuple[str, bool]]]] = []
    for i, record in enumerate(recs):
        where = recs.where(i)
        segments = render_segments(record, template, tokenizer, where=where, system_prompt=system_prompt, **extra)
        pieces = [(s.text, s.trainable) for s in segments if s.text]
        if train_on == "last_turn":
            last = max((k for k, (_, trainable) in enumerate(pieces) if trainable), default=-1)
            pieces = [(text, k == last) for k, (text, _) in enumerate(pieces)]
        rendered.append((where, pieces))

    flat = [text for _, segs in rendered for text, _ in segs]
    ids_per_segment = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    examples: list[Example] = []
    truncated = 0
    emptied: list[str] = []
    k = 0
    for where, segs in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, trainable in segs:
            ids = list(ids_per_segment[k])
            k += 1
            input_ids.extend(ids)
            labels.extend(ids if (trainable or train_on_prompt) else [IGNORE_INDEX] * len(ids))
        if len(input_ids) > max_length:
            if truncation == "error":
                raise ConfigError(f"{where}: {len(input_ids)} tokens, longer than max_length={max_length} "
                                  "(raise max_length, or use truncation='truncate')")
            truncated += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        example = Example(input_ids, labels, where)
        if example.num_trained == 0:
            emptied.append(where)
            continue
        examples.append(example)
    if truncated:
        message = (f"{recs.source}: {truncated} of {len(recs)} examples were longer than max_length={max_length} "
                   "tokens and were truncated")
        if emptied:
            shown = ", ".join(emptied[:5]) + (" ..." if len(emptied) > 5 else "")
            message += f"; {len(emptied)} of them lost their whole answer and were left out ({shown})"
        warnings.warn(message, UserWarning, stacklevel=2)
    elif emptied:  # cannot happen for validated records, but never drop silently
        raise ConfigError(f"{emptied[0]}: the example has no tokens to learn from")
    if not examples:
        raise ConfigError(f"{recs.source}: no example has any answer tokens within max_length={max_length}")
    return examples


def pack_examples(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate consecutive examples into sequences of at most `max_length` tokens (order kept, none split).

    Each pack records its examples' lengths (``segments``); `collate` turns them into position ids that restart
    at 0 for every example, and the trainer into a block-diagonal causal mask (SDPA, eager) or flash-attention
    varlen boundaries, so an example attends only to itself and its per-token losses equal the unpacked ones.
    The first token of each example after the first gets label -100: it would be predicted from the previous
    example's last token (unpacked, the shift drops it).
    """
    max_length = _check_length("max_length", max_length)
    packs: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    wheres: list[str] = []
    lengths: list[int] = []
    for example in examples:
        if len(example) > max_length:
            raise ConfigError(f"{example.where or 'example'}: {len(example)} tokens do not fit a pack of "
                              f"max_length={max_length}")
        if ids and len(ids) + len(example) > max_length:
            packs.append(Example(ids, labels, "+".join(wheres), lengths))
            ids, labels, wheres, lengths = [], [], [], []
        if ids:
            ids = ids + example.input_ids
            labels = [*labels, IGNORE_INDEX, *example.labels[1:]]
        else:
            ids, labels = list(example.input_ids), list(example.labels)
        wheres.append(example.where)
        lengths.append(len(example))
    if ids:
        packs.append(Example(ids, labels, "+".join(wheres), lengths))
    return packs


def collate(examples: Sequence[Example], pad_token_id: int, *, pad_to_multiple_of: int | None = None
            ) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids`` (pad id), ``attention_mask`` (0 on padding), ``labels`` (-100).

    When any example is a pack, ``position_ids`` too (restarting at 0 per packed example; padding counts as one
    more segment), from which `llmtune.data.packing.block_causal_mask` builds the per-example attention mask.
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
        raise InvalidOptionError(f"pad_token_id must be an int, got {pad_token_id!r}")
    width = max(len(e) for e in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.segments is not None for e in examples):
        positions = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example)
            positions[row, :n] = torch.tensor(example.position_ids, dtype=torch.long)
            positions[row, n:] = torch.arange(width - n)
        batch["position_ids"] = positions
    return batch


def is_tokenized(data: object) -> bool:
    """True when ``data`` is a list of pre-tokenized examples (`Example`s or mappings with ``input_ids``)."""
    if isinstance(data, (str, bytes, Path)) or not isinstance(data, Sequence) or not data:
        return False
    first = data[0]
    return isinstance(first, Example) or (isinstance(first, dict) and "input_ids" in first)


def tokenized_examples(items: Iterable[Example | dict[str, Any]], *, source: str = "data") -> list[Example]:
    """Pre-tokenized examples, checked: `Example`s as they are, or ``{"input_ids": [...], "labels": [...]}``.

    ``labels`` may be left out (every token is then learned: labels = input_ids); -100 marks no loss.
    """
    out: list[Example] = []
    for i, item in enumerate(items):
        where = f"{source}[{i}]"
        if isinstance(item, Example):
            out.append(item)
            continue
        if not isinstance(item, dict) or "input_ids" not in item:
            raise ConfigError(f"{where}: a pre-tokenized example is an Example or a dict with 'input_ids', "
                              f"not {type(item).__name__}")
        ids = item["input_ids"]
        labels = item.get("labels", ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids) or not ids:
            raise ConfigError(f"{where}: input_ids must be a non-empty list of ints")
        if len(labels) != len(ids):
            raise ConfigError(f"{where}: labels ({len(labels)}) and input_ids ({len(ids)}) differ in length")
        out.append(Example([int(t) for t in ids], [int(t) for t in labels], where))
    return out
