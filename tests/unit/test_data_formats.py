"""Golden tests: ShareGPT conversion, tool role and tool calls, masking strategies, system prompts, Llama 3.1 bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.data import (
    IGNORE_INDEX,
    build_examples,
    detect_format,
    llama31_chat_template,
    load_records,
    render_prompt,
    render_segments,
    render_text,
    to_messages,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIXTURE = Path(__file__).parent.parent / "fixtures" / "llama3.1" / "tokenizer_config.json"

SHAREGPT = {"system": "You are a kopitiam uncle.", "conversations": [
    {"from": "human", "value": "Kopi O?"}, {"from": "gpt", "value": "Black coffee."},
    {"from": "human", "value": "Kosong?"}, {"from": "gpt", "value": "No sugar."}]}
WEATHER = {"type": "function", "function": {
    "name": "menu_price", "description": "Price of a drink in SGD",
    "parameters": {"type": "object", "properties": {"drink": {"type": "string"}}, "required": ["drink"]}}}
TOOL_CHAT = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Answer with prices."},
    {"role": "user", "content": "How much is Kopi C?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "menu_price", "arguments": "{\"drink\": \"Kopi C\"}"}}]},
    {"role": "tool", "content": "1.60", "tool_call_id": "c1"},
    {"role": "assistant", "content": "Kopi C is $1.60."}]}
TWO_TURNS = {"messages": [{"role": "user", "content": "Kopi O?"}, {"role": "assistant", "content": "Black coffee."},
                          {"role": "user", "content": "Kosong?"}, {"role": "assistant", "content": "No sugar."}]}


def trained_text(tok: Any, example: Any) -> str:
    return str(tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]))


def test_sharegpt_converts_to_chat_turns(tok: Any) -> None:
    assert detect_format(SHAREGPT) == "sharegpt"
    assert to_messages(SHAREGPT) == [
        {"role": "system", "content": "You are a kopitiam uncle."}, {"role": "user", "content": "Kopi O?"},
        {"role": "assistant", "content": "Black coffee."}, {"role": "user", "content": "Kosong?"},
        {"role": "assistant", "content": "No sugar."}]
    assert render_text(SHAREGPT, "chatml", tok) == (
        "<|im_start|>system\nYou are a kopitiam uncle.<|im_end|>\n<|im_start|>user\nKopi O?<|im_end|>\n"
        "<|im_start|>assistant\nBlack coffee.<|im_end|>\n<|im_start|>user\nKosong?<|im_end|>\n"
        "<|im_start|>assistant\nNo sugar.<|im_end|>")
    call = {"conversations": [{"from": "human", "value": "Price of Teh?"},
                              {"from": "function_call", "value": "{\"name\": \"menu_price\", \"arguments\": {\"drink\": \"Teh\"}}"},
                              {"from": "observation", "value": "1.40"}, {"from": "gpt", "value": "$1.40."}]}
    assert to_messages(call)[1:3] == [
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "menu_price", "arguments": {"drink": "Teh"}}}]},
        {"role": "tool", "content": "1.40"}]


def test_tool_role_and_tool_calls_golden(tok: Any) -> None:
    messages = to_messages(TOOL_CHAT)
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"drink": "Kopi C"}  # JSON text parsed
    segments = render_segments({k: v for k, v in TOOL_CHAT.items() if k != "tools"}, "llama3", tok)
    assert [(s.text, s.trainable) for s in segments] == [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer with prices.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHow much is Kopi C?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ('{"name": "menu_price", "parameters": {"drink": "Kopi C"}}<|eot_id|>', True),
        ("<|start_header_id|>ipython<|end_header_id|>\n\n1.60<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Kopi C is $1.60.<|eot_id|>", True)]
    chatml = render_text({k: v for k, v in TOOL_CHAT.items() if k != "tools"}, "chatml", tok)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "menu_price", "arguments": {"drink": "Kopi C"}}\n'
            '</tool_call><|im_end|>\n<|im_start|>tool\n1.60<|im_end|>\n') in chatml
    (example,) = build_examples([TOOL_CHAT], tok, template="llama3.1", max_length=2048)
    assert trained_text(tok, example) == ('{"name": "menu_price", "parameters": {"drink": "Kopi C"}}<|eot_id|>'
                                          "Kopi C is $1.60.<|eot_id|>")  # the tool result is never trained
    with pytest.raises(ConfigError, match="field 'tools': template 'chatml' has no place"):
        render_text(TOOL_CHAT, "chatml", tok)
    with pytest.raises(ConfigError, match="alpaca' has no tool turns"):
        render_text(TOOL_CHAT, "alpaca", tok)


def test_masking_strategies(tok: Any) -> None:
    (every,) = build_examples([TWO_TURNS], tok, template="llama3")
    (last,) = build_examples([TWO_TURNS], tok, template="llama3", train_on="last_turn")
    (everything,) = build_examples([TWO_TURNS], tok, template="llama3", train_on="everything")
    assert trained_text(tok, every) == "Black coffee.<|eot_id|>No sugar.<|eot_id|>"
    assert trained_text(tok, last) == "No sugar.<|eot_id|>"
    assert last.input_ids == every.input_ids
    assert everything.labels == everything.input_ids
    with pytest.raises(InvalidOptionError, match="train_on"):
        build_examples([TWO_TURNS], tok, train_on="final")


def test_system_prompt_only_where_there_is_none(tok: Any) -> None:
    text = render_text(TWO_TURNS, "llama3", tok, system_prompt="Be brief.")
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert "Be brief." not in render_text(SHAREGPT, "llama3", tok, system_prompt="Be brief.")
    order = {"instruction": "Translate.", "output": "Tea."}
    (example,) = build_examples([order], tok, template="chatml", system_prompt="Be brief.")
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(ConfigError, match="field 'system': a system prompt is given twice"):
        to_messages({"system": "a", "messages": [{"role": "system", "content": "b"}, *TWO_TURNS["messages"]]})


def llama31_tokenizer(tok: Any) -> Any:
    """A tokenizer whose config is the Llama 3.1 fixture's (its chat template and special tokens)."""
    config = json.loads(FIXTURE.read_text())
    meta = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token=config["bos_token"],
                         eos_token=config["eos_token"], pad_token="<|pad|>")
    meta.chat_template = config["chat_template"]
    return meta


@pytest.mark.parametrize("record", [
    {"messages": [{"role": "user", "content": "Kopi O?"}, {"role": "assistant", "content": " Black coffee.\n"}]},
    SHAREGPT, TWO_TURNS, TOOL_CHAT,
    {**TOOL_CHAT, "messages": [*TOOL_CHAT["messages"][:3],
                               {"role": "tool", "content": {"price": 1.6, "currency": "SGD"}},
                               TOOL_CHAT["messages"][4]]},
], ids=["one-turn", "sharegpt-system", "two-turns", "tools", "tool-object-result"])
@pytest.mark.parametrize("date", [None, "1 Dec 2026"])
def test_llama31_bytes_equal_apply_chat_template(tok: Any, record: dict[str, Any], date: str | None) -> None:
    meta = llama31_tokenizer(tok)
    assert json.loads(FIXTURE.read_text())["chat_template"] == llama31_chat_template()
    messages = to_messages(record)
    extra = {"date_string": date} if date else {}
    kwargs = {"tools": record.get("tools"), **extra}
    want = meta.apply_chat_template(messages, tokenize=False, **kwargs)
    assert render_text(record, "llama3.1", tok, **extra).encode() == want.encode()
    assert "Cutting Knowledge Date: December 2023\nToday Date: " + (date or "26 Jul 2024") + "\n\n" in want
    prompt, _ = render_prompt(record, "llama3.1", tok, **extra)
    want_prompt = meta.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True, **kwargs)
    assert prompt.encode() == want_prompt.encode()
    # and the tokenizer path splits the same text into the same prompt / answer segments
    ours = [(s.text, s.trainable) for s in render_segments(record, "llama3.1", tok, **extra)]
    if not date:
        assert ours == [(s.text, s.trainable) for s in render_segments(record, "tokenizer", meta)]


BAD_LINES = [
    ('{"conversations": "hi"}', "field 'conversations': must be a list"),
    ('{"conversations": []}', "field 'conversations': is empty"),
    ('{"conversations": [{"value": "x"}]}', "field 'conversations[0].from': missing"),
    ('{"conversations": [{"from": "bot", "value": "x"}]}', "field 'conversations[0].from': unknown role 'bot'"),
    ('{"conversations": [{"from": "human", "value": 3}]}', "field 'conversations[0].value': must be a string"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}',
     "field 'conversations[1].from': expected a 'assistant' turn"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "{oops"}]}',
     "field 'conversations[1].value': a function_call must be JSON"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "1"}]}',
     "field 'messages[1].role': expected a 'assistant' turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]}',
     "field 'messages[1].tool_calls[0].function.name': missing"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": '
     '[{"name": "f", "arguments": "{bad"}]}]}', "field 'messages[1].tool_calls[0].arguments': invalid JSON"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x", "tool_calls": []}]}',
     "field 'messages[1].tool_calls': only an assistant turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "", "tool_calls": '
     '[{"name": "f", "arguments": {}}]}]}', None),  # a trailing tool call is a valid thing to learn
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "tools": 3}',
     "field 'tools': must be a list of objects"),
    ('{"system": 5, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}',
     "field 'system': must be a string"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES)
def test_malformed_records_name_file_line_field(tmp_path: Path, line: str, message: str | None) -> None:
    good = json.dumps(SHAREGPT)
    path = tmp_path / "data.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    if message is None:
        assert len(load_records(path)) == 2
        return
    with pytest.raises(ConfigError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:3: ") and message in str(err.value)


def test_csv_cells_hold_conversations_and_tools(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    convo = json.dumps(SHAREGPT["conversations"]).replace('"', '""')
    path.write_text(f'conversations,tools\n"{convo}",\n')
    (record,) = load_records(path)
    assert record["conversations"][0] == {"from": "human", "value": "Kopi O?"} and "tools" not in record
