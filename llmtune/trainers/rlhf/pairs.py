"""Preference data as per-prompt groups: a ranking of K answers -> every ordered pair, each answer encoded once.

A *group* is one prompt, K answers and the (better, worse) index pairs the ranking implies. A ranking of K
distinct ranks gives K(K-1)/2 pairs; tied answers make no pair between them (a pair record is a group of two).
The batch encodes each answer once (prompt + answer as one row) and the loss indexes rows by pair, so a
ranking of 4 answers costs 4 sequences, not the 12 of its 6 pairs written out.

    groups = preference_groups(records, tokenizer, template="llama3")   # records: PreferencePair / RankedRecord
    batch = collate_groups(groups[:8], tokenizer.pad_token_id)          # input_ids, completion_mask, chosen, rejected
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def ranking_pairs(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """Every (better, worse) index pair of ``ranking`` (lower rank = better), best answers first; ties give none."""
    order = sorted(range(len(ranking)), key=lambda i: (ranking[i], i))
    return [(a, b) for a, b in itertools.combinations(order, 2) if ranking[a] < ranking[b]]


def expected_pairs(ranking: Sequence[int]) -> int:
    """K(K-1)/2 minus t(t-1)/2 for every group of t tied answers: how many pairs `ranking_pairs` gives."""
    k = len(ranking)
    ties = sum(t * (t - 1) // 2 for t in (list(ranking).count(r) for r in set(ranking)))
    return k * (k - 1) // 2 - ties


@dataclass(frozen=True)
class Group:
    """One prompt's tokens, its K answers' tokens (each ending with the template's end-of-answer token), pairs."""

    prompt_ids: list[int]
    response_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float] = field(default_factory=list)  # one per pair (empty: no margin)
    where: str = "record"
    #: the reference policy's summed log-prob of each answer, computed once (empty: not precomputed)
    reference_logps: tuple[float, ...] = ()


def encode_group(prompt: str, responses: Sequence[str], ranking: Sequence[int], tokenizer: PreTrainedTokenizerBase,
                 *, max_length: int = 1024, margin_per_rank: float = 0.0, where: str = "record",
                 names: Sequence[str] = ()) -> Group:
    """A group from rendered texts: ``prompt`` up to the answer header, ``responses`` with their end token.

    Nothing is truncated: a prompt + answer longer than ``max_length`` would lose the answer's end token (where
    the reward head reads, and what DPO's log-probs end on), and cut answers can become token-identical; both are
    a `ConfigError` naming the record and the answer (``names``: field names, default ``responses[i]``)."""
    if len(responses) != len(ranking) or len(responses) < 2:
        raise ConfigError(f"{where}: ranking: need one rank per response and two or more responses, got "
                          f"{len(ranking)} ranks for {len(responses)} responses")
    names = list(names) or [f"responses[{i}]" for i in range(len(responses))]
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) >= max_length:
        raise ConfigError(f"{where}: prompt: {len(prompt_ids)} tokens leave no room for an answer in "
                          f"max_length={max_length}")
    answers = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
    longest = max(range(len(answers)), key=lambda i: len(answers[i]))
    if len(prompt_ids) + len(answers[longest]) > max_length:
        raise ConfigError(f"{where}: {names[longest]}: prompt ({len(prompt_ids)} tokens) + answer "
                          f"({len(answers[longest])} tokens) exceed max_length={max_length}; cut, the answer would "
                          f"lose its end token; raise max_length to {len(prompt_ids) + len(answers[longest])} or "
                          "shorten the record")
    first: dict[tuple[int, ...], int] = {}
    for b, ans in enumerate(answers):
        a = first.setdefault(tuple(ans), b)
        if ranking[a] != ranking[b]:  # tied copies make no pair
            raise ConfigError(f"{where}: {names[b]} is the same tokens as {names[a]} under the template: a pair of "
                              "equal answers teaches nothing; remove one")
    pairs = ranking_pairs(ranking)
    margins = [margin_per_rank * (ranking[b] - ranking[a]) for a, b in pairs] if margin_per_rank else []
    return Group(prompt_ids, answers, pairs, margins, where)


def _turns(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [dict(t) for t in value]


def _answer(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    return dict(value[0] if isinstance(value, list) else value)


def group_texts(record: Any, template: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[str], list[int]]:
    """(prompt text, answer texts, ranking) of a parsed preference record under ``template``.

    ``record``: anything with ``prompt`` and either ``responses`` + ``ranking`` or ``chosen`` + ``rejected``
    (the `llmtune.data` preference records, or a dict of the same fields). The prompt is rendered once; each
    answer is what the template adds after it (ending with the end-of-answer token).
    """
    from llmtune.data.templates import render_segments

    def get(key: str, default: Any = None) -> Any:
        return record.get(key, default) if isinstance(record, dict) else getattr(record, key, default)

    where = str(get("where", "") or "record")
    responses = get("responses")
    if responses is not None:
        answers, ranking = [_answer(r) for r in responses], list(get("ranking"))
    else:
        answers, ranking = [_answer(get("chosen")), _answer(get("rejected"))], [0, 1]
    prompt_turns = _turns(get("prompt"))
    prompt_text, texts = None, []
    for answer in answers:
        segments = render_segments({"messages": [*prompt_turns, answer]}, template, tokenizer, where=where)
        text = "".join(s.text for s in segments[:-1])
        if prompt_text not in (None, text):  # pragma: no cover - templates render the prompt independently
            raise ConfigError(f"{where}: template {template!r} renders the prompt differently for two answers")
        prompt_text = text
        texts.append(segments[-1].text)
    return str(prompt_text), texts, ranking


def preference_groups(records: Iterable[Any], tokenizer: PreTrainedTokenizerBase, *, template: str = "llama3",
                      max_length: int = 1024, margin_per_rank: float = 0.0) -> list[Group]:
    """Groups from preference records (pairs and rankings), one per record.

    ``records``: `llmtune.data.preference` records (``PreferencePair`` / ``RankedRecord``), or dicts, which are
    validated by `llmtune.data.preference.parse_preference` first (errors name the record and field).
    """
    from llmtune.data.preference import parse_preference

    groups = []
    for i, record in enumerate(records):
        if isinstance(record, dict):
            record = parse_preference(record, str(record.get("where") or f"record {i}"))
        prompt, texts, ranking = group_texts(record, template, tokenizer)
        where = str((record.get("where") if isinstance(record, dict) else getattr(record, "where", "")) or
                    f"record {i}")
        ranked = (record.get("responses") if isinstance(record, dict) else getattr(record, "responses", None))
        groups.append(encode_group(prompt, texts, ranking, tokenizer, max_length=max_length,
                                   margin_per_rank=margin_per_rank, where=where,
                                   names=() if ranked is not None else ("chosen", "rejected")))
    return groups


def load_preference_groups(data: Any, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> list[Group]:
    """Groups from a preference file (.jsonl/.json/.csv) or dicts, validated by `llmtune.data`'s preference records."""
    from llmtune.data.preference import load_preference_records

    return preference_groups(load_preference_records(data), tokenizer, **kwargs)


def collate_groups(groups: Sequence[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows (one per answer of every group) and the rows of each pair's chosen / rejected answer.

    Keys: ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on answer tokens), ``chosen`` and
    ``rejected`` (row indices, one per pair), ``margin`` (one per pair, zeros without margins); and
    ``reference_logps`` (one per row) when the groups carry precomputed reference log-probs.
    """
    import torch

    with_ref = [bool(g.reference_logps) for g in groups]
    if any(with_ref) and not all(with_ref):
        raise ConfigError("collate_groups: some groups carry precomputed reference log-probs and some do not")

    rows: list[list[int]] = []
    masks: list[list[int]] = []
    chosen: list[int] = []
    rejected: list[int] = []
    margins: list[float] = []
    for g in groups:
        base = len(rows)
        for ans in g.response_ids:
            rows.append(g.prompt_ids + ans)
            masks.append([0] * len(g.prompt_ids) + [1] * len(ans))
        for n, (a, b) in enumerate(g.pairs):
            chosen.append(base + a)
            rejected.append(base + b)
            margins.append(g.margins[n] if g.margins else 0.0)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
        comp[i, :len(r)] = torch.tensor(m)
    out = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp,
           "chosen": torch.tensor(chosen, dtype=torch.long), "rejected": torch.tensor(rejected, dtype=torch.long),
           "margin": torch.tensor(margins, dtype=torch.float)}
    if with_ref and all(with_ref):
        out["reference_logps"] = torch.tensor([x for g in groups for x in g.reference_logps], dtype=torch.float64)
    return out


__all__ = ["Group", "collate_groups", "encode_group", "expected_pairs", "group_texts", "load_preference_groups",
           "preference_groups", "ranking_pairs"]
