"""Loading records (JSONL / JSON / CSV), format detection, and errors that name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmtune.core.errors import ConfigError
from llmtune.data import FORMATS, Records, as_records, detect_format, load_records, to_messages
from llmtune.data.kopitiam import (
    bundled_corpus,
    bundled_instructions,
    generate_orders,
    is_heldout,
    order_of,
    split_instructions,
)

INSTR = {"instruction": "What is Kopi O?", "input": "", "output": "Black coffee."}
CHAT = {"messages": [{"role": "user", "content": "Kopi?"}, {"role": "assistant", "content": "Coffee."}]}
TEXT = {"text": "A kopitiam is a coffee shop."}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_loads_every_format_and_remembers_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", "\n".join([json.dumps(INSTR), "", json.dumps(CHAT), json.dumps(TEXT)]) + "\n")
    records = load_records(path)
    assert list(records) == [INSTR, CHAT, TEXT]
    assert [detect_format(r) for r in records] == ["instruction", "chat", "text"]
    assert records.where(0) == f"{path}:1"
    assert records.where(1) == f"{path}:3"  # the blank line is counted, not shifted
    assert records.where(2) == f"{path}:4"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"instruction": "x", "output": ', "invalid JSON"),
        ('{"instruction": "x"}', "field 'output': missing"),
        ('{"instruction": "x", "output": 3}', "field 'output': must be a string, got int"),
        ('{"instruction": "x", "input": 7, "output": "y"}', "field 'input': must be a string, got int"),
        ('{"instruction": "  ", "output": "y"}', "field 'instruction': is empty"),
        ('{"text": null}', "field 'text': must be a string, got null"),
        ('{"prompt": "x", "answer": "y"}', "cannot tell the format (fields present: 'prompt', 'answer')"),
        ("[1, 2]", "a record must be an object, got list"),
        ('{"messages": "hi"}', "field 'messages': must be a list"),
        ('{"messages": []}', "field 'messages': is empty"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "field 'messages[0].role': unknown role 'bot'"),
        ('{"messages": [{"content": "x"}]}', "field 'messages[0].role': missing"),
        ('{"messages": [{"role": "user", "content": 1}]}', "field 'messages[0].content': must be a string, got int"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
         "field 'messages[1].role': a system message may only come first"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
         "field 'messages[1].role': expected a 'assistant' turn"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "field 'messages[0].role': expected a 'user' turn"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "field 'messages[0].role': the last message must be"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
         "field 'messages[1].content': is empty"),
        ('{"messages": ["hi"]}', "field 'messages[0]': must be an object"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, "bad.jsonl", json.dumps(INSTR) + "\n" + json.dumps(TEXT) + "\n" + line + "\n")
    with pytest.raises(ConfigError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert expected in message


def test_null_input_and_extra_fields_are_accepted(tmp_path: Path) -> None:
    record = {"id": 7, "instruction": "Say hi", "input": None, "output": "Hi.", "category": "x"}
    path = write(tmp_path, "d.jsonl", json.dumps(record) + "\n")
    assert load_records(path)[0] == record
    assert to_messages(record) == [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi."}]


def test_instruction_with_input_and_system_becomes_turns() -> None:
    record = {"system": "Be brief.", "instruction": "Translate.", "input": "Kopi O", "output": "Black coffee."}
    assert to_messages(record) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nKopi O"},
        {"role": "assistant", "content": "Black coffee."},
    ]


def test_messages_take_precedence_then_instruction_then_text() -> None:
    assert detect_format({**CHAT, "text": "rendered"}) == "chat"
    assert detect_format({**INSTR, "text": "rendered"}) == "instruction"  # tatsu-lab/alpaca carries both
    assert FORMATS == ("instruction", "chat", "sharegpt", "text")


def test_json_array_keeps_line_numbers(tmp_path: Path) -> None:
    text = "[\n  " + json.dumps(INSTR) + ",\n\n  " + json.dumps(TEXT) + "\n]\n"
    path = write(tmp_path, "d.json", text)
    records = load_records(path)
    assert list(records) == [INSTR, TEXT]
    assert records.lines == [2, 4]
    bad = write(tmp_path, "bad.json", "[\n" + json.dumps(INSTR) + ",\n" + '{"instruction": "x", "output": 1}' + "\n]")
    with pytest.raises(ConfigError, match=r"bad\.json:3: field 'output': must be a string, got int"):
        load_records(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"text": "a"} {"text": "b"}]', r":1: expected ',' or ']' after record 1"),
        ('[{"text": "a"}] trailing', r":1: unexpected text after the closing"),
        ('"just a string"', r":1: expected a JSON array"),
        ('[\n{"text": "a"},\n{"text": tru}\n]', r":3: invalid JSON at column 10"),
    ],
)
def test_broken_json_array(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_records(write(tmp_path, "d.json", text))


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "d.json", json.dumps(INSTR) + "\n" + json.dumps(CHAT) + "\n")
    assert list(load_records(path)) == [INSTR, CHAT]


def test_csv_and_tsv(tmp_path: Path) -> None:
    path = write(tmp_path, "d.csv", 'instruction,input,output\nWhat is Kopi O?,,Black coffee.\n'
                 'Translate.,"Teh C, hot",Tea with evaporated milk.\n')
    records = load_records(path)
    assert list(records) == [
        {"instruction": "What is Kopi O?", "input": "", "output": "Black coffee."},
        {"instruction": "Translate.", "input": "Teh C, hot", "output": "Tea with evaporated milk."},
    ]
    assert records.lines == [2, 3]
    tsv = write(tmp_path, "d.tsv", "text\tsource\nA kopitiam.\tme\n")
    assert list(load_records(tsv)) == [{"text": "A kopitiam.", "source": "me"}]


def test_csv_messages_column_is_json(tmp_path: Path) -> None:
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    path = write(tmp_path, "chat.csv", f'messages\n"{cell}"\n')
    assert list(load_records(path)) == [CHAT]
    bad = write(tmp_path, "bad.csv", 'messages\n"[{oops"\n')
    with pytest.raises(ConfigError, match=r"bad\.csv:2: field 'messages': invalid JSON"):
        load_records(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("instruction,output\nHi,Hello,extra\n", r":2: 3 cells but the header has 2 columns"),
        ("instruction,input,output\nHi,Hello\n", r":2: field 'output': missing"),
        ("instruction,output\nHi,Hello\nHi,\n", r":3: field 'output': is empty"),
        ("", r":1: empty file"),
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_records(write(tmp_path, "d.csv", text))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such data file"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigError, match=r"unknown data file type '\.parquet'"):
        load_records(write(tmp_path, "d.parquet", "x"))
    with pytest.raises(ConfigError, match="no records"):
        load_records(write(tmp_path, "empty.jsonl", "\n\n"))
    raw = tmp_path / "latin1.jsonl"
    raw.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_records(raw)


def test_in_memory_records_are_validated_with_index() -> None:
    records = as_records([INSTR, {"instruction": "x"}, TEXT][:1], source="mine")
    assert isinstance(records, Records) and records.where(0) == "mine[0]"
    with pytest.raises(ConfigError, match=r"^mine\[1\]: field 'output': missing"):
        as_records([INSTR, {"instruction": "x"}], source="mine")
    with pytest.raises(ConfigError, match="no records"):
        as_records([])


def test_bundled_instructions_are_valid_and_match_the_lexicon() -> None:
    records = bundled_instructions()
    assert records == generate_orders()
    assert len(records) == 450
    assert all(detect_format(r) == "instruction" for r in records)
    by_order = {order_of(r): r["output"] for r in records}
    assert by_order["Kopi O Kosong"] == "Black coffee, no sugar."
    assert by_order["Teh C Siew Dai"] == "Tea with evaporated milk, less sweet."
    assert by_order["Kopi O Gau Kosong Peng"] == "Iced strong black coffee, no sugar."
    assert by_order["Milo Peng"] == "Iced Milo."


def test_split_is_by_drink_deterministic_and_disjoint() -> None:
    train, heldout = split_instructions()
    assert (train, heldout) == split_instructions()
    assert len(train) + len(heldout) == 450
    train_orders = {order_of(r) for r in train}
    heldout_orders = {order_of(r) for r in heldout}
    assert not train_orders & heldout_orders
    assert 0.1 < len(heldout) / 450 < 0.3
    assert split_instructions(heldout_fraction=0.0)[1] == []
    assert split_instructions(heldout_fraction=1.0)[0] == []
    assert split_instructions(seed=1)[1] != heldout
    with pytest.raises(ValueError, match="heldout_fraction"):
        is_heldout("Kopi", 1.5)


def test_bundled_corpus_is_a_few_hundred_sentences() -> None:
    corpus = bundled_corpus()
    assert len(corpus) >= 60
    assert sum(p.count(". ") + 1 for p in corpus) >= 200
    assert not any(p.startswith("#") for p in corpus)
    assert any("Kosong means no sugar" in p for p in corpus)
