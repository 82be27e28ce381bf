"""Preference records (for reward models, DPO and other RLHF objectives): pairs and human rankings.

Two record shapes, each validated with errors that name file:line:field:

* **pairwise**: ``prompt``, ``chosen``, ``rejected``. ``prompt`` is a string (one user turn) or a list of chat
  turns ending with a user turn; ``chosen`` / ``rejected`` are a string or a one-element list holding an
  assistant turn. Without ``prompt`` (the "implicit prompt" of Anthropic HH-style data), ``chosen`` and
  ``rejected`` are whole conversations: their common leading turns are the prompt, and each must then add
  exactly one assistant turn. Optional ``system``.
* **ranked**: ``prompt``, ``responses`` (two or more, each like ``chosen`` above) and ``ranking``: one integer
  per response, lower is better (1 = best, or 0 = best as OpenAssistant writes it); ties are allowed and
  make no pair. `RankedRecord.pairs` gives every (better, worse) pair.

    records = load_preference_records("prefs.jsonl")       # [PreferencePair | RankedRecord]
    pairs = to_pairs(records)                              # [PreferencePair]
    prompt, chosen, rejected = preference_texts(pairs[0], "llama3.1", tokenizer)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import ConfigError
from llmtune.data.formats import _check_order, _fail, _message, _type_name
from llmtune.data.records import Records, read_records

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREFERENCE_FORMATS = ("pairwise", "ranked")
Turn = dict[str, Any]


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (chat turns ending with a user turn) and two assistant answers, the first preferred."""

    prompt: list[Turn]
    chosen: Turn
    rejected: Turn
    where: str = ""


@dataclass(frozen=True)
class RankedRecord:
    """A prompt, several assistant answers, and their ranks (lower is better)."""

    prompt: list[Turn]
    responses: list[Turn]
    ranking: list[int]
    where: str = ""

    def pairs(self) -> list[PreferencePair]:
        """Every (better, worse) pair, best answers first; tied answers make no pair."""
        order = sorted(range(len(self.responses)), key=lambda i: (self.ranking[i], i))
        return [PreferencePair(self.prompt, self.responses[a], self.responses[b], self.where)
                for a, b in itertools.combinations(order, 2) if self.ranking[a] < self.ranking[b]]


def _answer(value: Any, where: str, field: str) -> Turn:
    """A string or ``[assistant turn]``, as one normalised assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, field, "is empty")
        return {"role": "assistant", "content": value}
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or len(value) != 1:
        raise _fail(where, field, "must be a string or a list holding one assistant turn, got "
                    f"{_type_name(value) if not isinstance(value, list) else f'{len(value)} turns'}")
    turn = _message(value[0], where, f"{field}[0]", ("role", "content"))
    if turn["role"] != "assistant":
        raise _fail(where, f"{field}[0].role", f"must be 'assistant', got {turn['role']!r}")
    if not turn.get("tool_calls") and not str(turn["content"]).strip():
        raise _fail(where, f"{field}[0].content", "is empty")
    return turn


def _prompt(record: dict[str, Any], where: str) -> list[Turn]:
    """The prompt turns (a string is one user turn), with the record's ``system`` folded in; ends with a user turn."""
    if "prompt" not in record:
        raise _fail(where, "prompt", "missing")
    value = record["prompt"]
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, "prompt", "is empty")
        turns: list[Turn] = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        turns = [_message(m, where, f"prompt[{i}]", ("role", "content")) for i, m in enumerate(value)]
    else:
        raise _fail(where, "prompt", "must be a string or a non-empty list of chat turns, got "
                    f"{_type_name(value) if value != [] else 'an empty list'}")
    _check_order([*turns, {"role": "assistant", "content": "-"}], where, "prompt", "role", "content")
    system = record.get("system")
    if system not in (None, ""):
        if not isinstance(system, str):
            raise _fail(where, "system", f"must be a string, got {_type_name(system)}")
        if turns[0]["role"] == "system":
            raise _fail(where, "system", "a system prompt is given twice (also as prompt[0])")
        turns.insert(0, {"role": "system", "content": system})
    return turns


def parse_prompt(record: Any, where: str = "record") -> list[Turn]:
    """A record's validated ``prompt`` as chat turns ending with a user turn (its ``system`` folded in): what
    online RL (``rloo``/``grpo``) answers."""
    if not isinstance(record, dict):
        raise _fail(where, None, f"a record must be an object, got {_type_name(record)}")
    return _prompt(record, where)


def _implicit(record: dict[str, Any], where: str) -> PreferencePair:
    """chosen / rejected as whole conversations: the shared leading turns are the prompt."""
    convs = {}
    for field in ("chosen", "rejected"):
        value = record[field]
        if not isinstance(value, list) or len(value) < 2:
            raise _fail(where, "prompt", "missing (chosen/rejected without a prompt must be whole conversations)")
        convs[field] = [_message(m, where, f"{field}[{i}]", ("role", "content")) for i, m in enumerate(value)]
    n = 0
    while n < min(len(convs["chosen"]), len(convs["rejected"])) and convs["chosen"][n] == convs["rejected"][n]:
        n += 1
    for field, turns in convs.items():
        if len(turns) != n + 1:
            raise _fail(where, field, f"must add exactly one assistant turn to the {n} turns it shares with the other "
                        f"answer, it adds {len(turns) - n}")
    prompt = _prompt({**record, "prompt": convs["chosen"][:n]}, where)
    return PreferencePair(prompt, _answer(convs["chosen"][n:], where, f"chosen[{n}:]"),
                          _answer(convs["rejected"][n:], where, f"rejected[{n}:]"), where)


def _ranking(record: dict[str, Any], where: str) -> RankedRecord:
    prompt = _prompt(record, where)
    responses = record["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise _fail(where, "responses", "must be a list of two or more answers, got "
                    f"{_type_name(responses) if not isinstance(responses, list) else len(responses)}")
    answers = [_answer(r, where, f"responses[{i}]") for i, r in enumerate(responses)]
    if "ranking" not in record:
        raise _fail(where, "ranking", "missing (one rank per response, lower is better)")
    ranking = record["ranking"]
    if not isinstance(ranking, list) or len(ranking) != len(answers):
        raise _fail(where, "ranking", f"must be a list of {len(answers)} ranks (one per response), got "
                    f"{len(ranking) if isinstance(ranking, list) else _type_name(ranking)}")
    for i, rank in enumerate(ranking):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise _fail(where, f"ranking[{i}]", f"must be an int >= 0, got {rank!r}")
    if len(set(ranking)) == 1:
        raise _fail(where, "ranking", "every response has the same rank: there is no preference to learn")
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        j = first.setdefault(json.dumps(answer, sort_keys=True, default=str), i)
        if ranking[j] != ranking[i]:  # tied copies make no pair; ranked ones a pair of two equal texts
            raise _fail(where, f"responses[{i}]", f"is the same answer as responses[{j}], ranked {ranking[i]} and "
                        f"{ranking[j]}: a pair of equal texts teaches nothing; remove one")
    return RankedRecord(prompt, answers, list(ranking), where)


def parse_preference(record: Any, where: str = "record") -> PreferencePair | RankedRecord:
    """One validated preference record (pairwise or ranked)."""
    if not isinstance(record, dict):
        raise _fail(where, None, f"a record must be an object, got {_type_name(record)}")
    if "responses" in record or "ranking" in record:
        if "responses" not in record:
            raise _fail(where, "responses", "missing (a ranking ranks a list of responses)")
        return _ranking(record, where)
    if "chosen" not in record or "rejected" not in record:
        missing = "chosen" if "chosen" not in record else "rejected"
        fields = ", ".join(repr(k) for k in record) or "none"
        raise _fail(where, missing, f"missing: a preference record has 'prompt', 'chosen' and 'rejected' (or "
                    f"'prompt', 'responses' and 'ranking'); fields present: {fields}")
    if "prompt" not in record:
        pair = _implicit(record, where)
    else:
        pair = PreferencePair(_prompt(record, where), _answer(record["chosen"], where, "chosen"),
                              _answer(record["rejected"], where, "rejected"), where)
    if pair.chosen == pair.rejected:
        raise _fail(where, "rejected", "is the same answer as 'chosen'")
    return pair


def preference_format(record: Any, where: str = "record") -> str:
    """``"pairwise"`` or ``"ranked"``, after validating the record."""
    return "ranked" if isinstance(parse_preference(record, where), RankedRecord) else "pairwise"


def load_preference_records(data: Any,
                            source: str | None = None) -> list[PreferencePair | RankedRecord]:
    """Preference records from a file (.jsonl/.json/.csv), a dataset source or mixture (`llmtune.data.sources`)
    or dicts; errors name file:line:field (``name:row i`` for dataset rows)."""
    from llmtune.data.sources import as_spec

    spec = as_spec(data)
    if spec is not None:
        records = spec.records(source or "data")
    elif isinstance(data, (str, Path)):
        records = read_records(data)
    elif isinstance(data, Records):
        records = data
    else:
        records = Records(list(data), source=source or "records")
        if not records:
            raise ConfigError(f"{records.source}: no records")
    return [parse_preference(r, records.where(i)) for i, r in enumerate(records)]


def to_pairs(records: Iterable[PreferencePair | RankedRecord]) -> list[PreferencePair]:
    """Pairs, with every ranked record expanded into its (better, worse) pairs."""
    out: list[PreferencePair] = []
    for r in records:
        out.extend(r.pairs() if isinstance(r, RankedRecord) else [r])
    return out


def preference_texts(pair: PreferencePair, template: str, tokenizer: PreTrainedTokenizerBase,
                     **kwargs: Any) -> tuple[str, str, str]:
    """(prompt text up to the answer header, chosen answer text, rejected answer text) under ``template``.

    The answers end with the template's end-of-answer token, so ``prompt + chosen`` is exactly the training
    text `llmtune.data.render_text` gives the chat record ``prompt + [chosen]``. ``kwargs``: those of
    `llmtune.data.render_segments` (``date_string``, ``system_prompt``).
    """
    from llmtune.data.templates import render_segments

    texts = []
    for answer in (pair.chosen, pair.rejected):
        record: dict[str, Any] = {"messages": [*pair.prompt, answer]}
        segments = render_segments(record, template, tokenizer, where=pair.where or "record", **kwargs)
        texts.append(("".join(s.text for s in segments[:-1]), segments[-1].text))
    (prompt, chosen), (prompt_r, rejected) = texts
    if prompt != prompt_r:  # pragma: no cover - every template renders the prompt independently of the answer
        raise ConfigError(f"{pair.where}: template {template!r} renders the prompt differently for the two answers")
    return prompt, chosen, rejected
