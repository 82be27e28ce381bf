"""The exported chat templates render what llmtune trained on: Jinja (through transformers' apply_chat_template)
and the Ollama TEMPLATE (through a small evaluator of the Go-template constructs it uses)."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytest.importorskip("transformers")

from llmtune.data import render_prompt, render_text
from llmtune.export.chat import JINJA, modelfile, ollama_template, stop_tokens

RECORDS = [
    {"instruction": "What is Kopi O Kosong?", "output": "Black coffee, no sugar."},
    {"instruction": "Translate", "output": "Tea with milk.", "system": "You are a kopitiam uncle."},
    {"messages": [{"role": "user", "content": "Kopi C?"}, {"role": "assistant", "content": "Coffee, milk."},
                  {"role": "user", "content": "And Teh O?"}, {"role": "assistant", "content": "Tea, sugar."}]},
]


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    from llmtune.data.formats import to_messages

    return to_messages(record)


@pytest.mark.parametrize("template", ["llama3", "chatml", "alpaca", "llama3.1"])
@pytest.mark.parametrize("i", range(len(RECORDS)))
def test_jinja_prompt_equals_llmtune_prompt(tok: Any, template: str, i: int) -> None:
    record = RECORDS[i]
    messages = _messages(record)[:-1]
    rendered = tok.apply_chat_template(messages, chat_template=JINJA[template], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == render_prompt(record, template, tok)[0]


@pytest.mark.parametrize("template", ["llama3", "alpaca", "llama3.1"])
def test_jinja_full_conversation_equals_training_text(tok: Any, template: str) -> None:
    record = RECORDS[2]
    rendered = tok.apply_chat_template(_messages(record), chat_template=JINJA[template], tokenize=False)
    assert rendered == render_text(record, template, tok)


def _parse(template: str) -> list[Any]:
    """The Go-template subset our Modelfiles use, as a tree: text, ("var", x), ("range", body), ("if", branches)."""
    parts = re.split(r"(\{\{-? .*? \}\})", template)
    root: list[Any] = []
    stack: list[Any] = [root]
    for part in parts:
        action = re.fullmatch(r"\{\{-? (.*?) \}\}", part)
        if action is None:
            stack[-1].append(part)
            continue
        word = action.group(1)
        if word.startswith("range "):
            node: list[Any] = []
            stack[-1].append(("range", node))
            stack.append(node)
        elif word.startswith("if "):
            branch: list[Any] = []
            stack[-1].append(("if", [(word[3:], branch)]))
            stack.append(branch)
        elif word.startswith("else"):
            stack.pop()
            branches = stack[-1][-1][1]
            branch = []
            branches.append((word[8:] if word.startswith("else if ") else "true", branch))
            stack.append(branch)
        elif word == "end":
            stack.pop()
        else:
            stack[-1].append(("var", word))
    assert len(stack) == 1, "unbalanced template"
    return root


def _eval(nodes: list[Any], messages: list[dict[str, str]], system: str, msg: dict[str, str], index: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "var":
            field = node[1].split(".")[-1]
            out.append({"Role": msg.get("role", ""), "Content": msg.get("content", ""), "System": system}[field])
        elif node[0] == "range":
            out.extend(_eval(node[1], messages, system, m, i) for i, m in enumerate(messages))
        else:
            for condition, body in node[1]:
                role = re.fullmatch(r'eq \.Role "(\w+)"', condition)
                hit = {"true": True, "$i": index > 0, ".System": bool(system)}.get(condition) if role is None \
                    else msg.get("role") == role.group(1)
                if hit:
                    out.append(_eval(body, messages, system, msg, index))
                    break
    return "".join(out)


def _go(template: str, messages: list[dict[str, str]], system: str = "") -> str:
    """Render an Ollama TEMPLATE (``{{-`` trims no text in ours, since none of our actions follow whitespace)."""
    return _eval(_parse(template), messages, system, {}, 0)


@pytest.mark.parametrize("template", ["llama3", "chatml", "alpaca"])
@pytest.mark.parametrize("i", [0, 2])
def test_ollama_template_renders_the_llmtune_prompt(tok: Any, template: str, i: int) -> None:
    record = RECORDS[i]
    messages = _messages(record)[:-1]
    assert _go(ollama_template(template, tok), messages) == render_prompt(record, template, tok)[0]


def test_ollama_alpaca_system_prompt(tok: Any) -> None:
    record = RECORDS[1]
    messages = [m for m in _messages(record)[:-1] if m["role"] != "system"]
    got = _go(ollama_template("alpaca", tok), messages, system=record["system"])
    assert got == render_prompt(record, "alpaca", tok)[0]


def test_modelfile_has_from_template_and_stops(tok: Any) -> None:
    text = modelfile("model-q8_0.gguf", "chatml", tok)
    assert text.splitlines()[0] == "FROM ./model-q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|end_of_text|>"' in text
    assert stop_tokens("alpaca", tok) == ["<|end_of_text|>"]
    assert "<|begin_of_text|>" not in ollama_template("llama3", tok, bos_in_template=False)


@pytest.mark.parametrize("template", ["llama3", "chatml", "alpaca"])
def test_no_trim_marker_follows_whitespace(tok: Any, template: str) -> None:
    # `{{-` trims the whitespace before it; ours never has any there, so the evaluator above may ignore it
    assert re.search(r"\s\{\{-", ollama_template(template, tok)) is None
