"""Preference records: pairwise (explicit and implicit prompt), ranked, texts under a template, file:line:field errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtune.core.errors import ConfigError
from llmtune.data import render_text
from llmtune.data.preference import (
    PreferencePair,
    RankedRecord,
    load_preference_records,
    parse_preference,
    preference_format,
    preference_texts,
    to_pairs,
)

USER = {"role": "user", "content": "Kopi O?"}
PAIR = {"prompt": "Kopi O?", "chosen": "Black coffee with sugar.", "rejected": "Milk tea."}


def test_pairwise_string_and_chat_forms_agree() -> None:
    a = parse_preference(PAIR)
    b = parse_preference({"prompt": [USER], "chosen": [{"role": "assistant", "content": "Black coffee with sugar."}],
                          "rejected": [{"role": "assistant", "content": "Milk tea."}]})
    assert a == b == PreferencePair([USER], {"role": "assistant", "content": "Black coffee with sugar."},
                                    {"role": "assistant", "content": "Milk tea."}, "record")
    assert preference_format(PAIR) == "pairwise"
    with_system = parse_preference({**PAIR, "system": "Be brief."})
    assert isinstance(with_system, PreferencePair) and with_system.prompt[0] == {"role": "system", "content": "Be brief."}


def test_implicit_prompt_is_the_shared_prefix() -> None:
    convo = [USER, {"role": "assistant", "content": "Black coffee."}, {"role": "user", "content": "Kosong?"}]
    pair = parse_preference({"chosen": [*convo, {"role": "assistant", "content": "No sugar."}],
                             "rejected": [*convo, {"role": "assistant", "content": "Extra sugar."}]})
    assert isinstance(pair, PreferencePair)
    assert pair.prompt == convo and pair.chosen["content"] == "No sugar." and pair.rejected["content"] == "Extra sugar."


def test_ranked_record_gives_every_ordered_pair_and_skips_ties() -> None:
    record = parse_preference({"prompt": "Kopi O?", "responses": ["a", "b", "c", "d"], "ranking": [2, 1, 3, 2]})
    assert isinstance(record, RankedRecord)
    assert preference_format({"prompt": "x", "responses": ["a", "b"], "ranking": [0, 1]}) == "ranked"
    pairs = [(p.chosen["content"], p.rejected["content"]) for p in record.pairs()]
    assert pairs == [("b", "a"), ("b", "d"), ("b", "c"), ("a", "c"), ("d", "c")]  # a and d tie: no pair
    assert len(to_pairs([record, parse_preference(PAIR)])) == 6


def test_preference_texts_match_the_training_text(tok: Any) -> None:
    pair = parse_preference(PAIR)
    assert isinstance(pair, PreferencePair)
    for template in ("llama3", "llama3.1", "chatml"):
        prompt, chosen, rejected = preference_texts(pair, template, tok)
        assert prompt + chosen == render_text({"messages": [USER, pair.chosen]}, template, tok)
        assert prompt + rejected == render_text({"messages": [USER, pair.rejected]}, template, tok)
    assert preference_texts(pair, "llama3", tok)[1] == "Black coffee with sugar.<|eot_id|>"


BAD = [
    ({"prompt": "x", "chosen": "y"}, "field 'rejected': missing"),
    ({"question": "x"}, "field 'chosen': missing"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "field 'prompt': is empty"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "field 'prompt': must be a string or a non-empty list"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
     "field 'prompt[0].role': expected a 'user' turn"),
    ({"prompt": "x", "chosen": "a", "rejected": 4}, "field 'rejected': must be a string or a list holding one"),
    ({"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen[0].role': must be 'assistant'"),
    ({"prompt": "x", "chosen": "same", "rejected": "same"}, "field 'rejected': is the same answer"),
    ({"chosen": "a", "rejected": "b"}, "field 'prompt': missing"),
    ({"chosen": [USER, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "field 'chosen': must add exactly one assistant turn"),
    ({"prompt": "x", "responses": ["a"], "ranking": [1]}, "field 'responses': must be a list of two or more"),
    ({"prompt": "x", "responses": ["a", "b"]}, "field 'ranking': missing"),
    ({"prompt": "x", "responses": ["a", "b"], "ranking": [1]}, "field 'ranking': must be a list of 2 ranks"),
    ({"prompt": "x", "responses": ["a", "b"], "ranking": [1, "2"]}, "field 'ranking[1]': must be an int"),
    ({"prompt": "x", "responses": ["a", "b"], "ranking": [1, 1]}, "field 'ranking': every response has the same"),
    ({"prompt": "x", "ranking": [1, 2]}, "field 'responses': missing"),
    ({"prompt": "x", "responses": ["a", ""], "ranking": [1, 2]}, "field 'responses[1]': is empty"),
]


@pytest.mark.parametrize(("record", "message"), BAD)
def test_malformed_preference_records_name_file_line_field(tmp_path: Path, record: dict[str, Any],
                                                           message: str) -> None:
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PAIR) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError) as err:
        load_preference_records(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value), str(err.value)


def test_in_memory_records_name_their_index() -> None:
    with pytest.raises(ConfigError, match=r"^mine\[1\]: field 'rejected': missing"):
        load_preference_records([PAIR, {"prompt": "x", "chosen": "y"}], source="mine")
    assert len(load_preference_records([PAIR])) == 1


def test_a_ranking_that_ranks_the_same_answer_twice_is_refused_naming_both():
    """A pair of equal texts teaches nothing (main trained it); tied copies make no pair and are kept."""
    from llmtune.core.errors import ConfigError
    from llmtune.data.preference import parse_preference

    record = {"prompt": "Kopi O?", "responses": ["Black coffee.", "Tea.", "Black coffee."], "ranking": [0, 1, 2]}
    with pytest.raises(ConfigError, match=r"prefs.jsonl:4: field 'responses\[2\]': is the same answer as "
                                          r"responses\[0\], ranked 2 and 0"):
        parse_preference(record, "prefs.jsonl:4")
    assert parse_preference({**record, "ranking": [0, 1, 0]}, "prefs.jsonl:4").ranking == [0, 1, 0]
