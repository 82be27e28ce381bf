"""Prompt templates: ``llama3`` (Meta's special tokens), ``chatml``, ``alpaca`` (Stanford), ``tokenizer`` (its own).

A record renders as a list of `Segment`s — text plus whether the model is trained on it. Answers (assistant
turns, or a text record's whole text) are trainable and end with the template's end-of-answer token; everything
else (system, user turns, headers) is prompt. Concatenating the segments gives the exact training text:

* llama3: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>``
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` + answer ``{assistant}<|eot_id|>`` (contents trimmed,
  as in Meta's template; a system turn, if any, comes first in the same form).
* chatml: ``<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n`` + answer ``{assistant}<|im_end|>``.
* alpaca: the Stanford Alpaca prompt (with or without ``### Input:``), answer ``{output}`` + the eos token.
* llama3.1: Meta's Llama 3.1 chat format, byte for byte what ``apply_chat_template`` renders with the Llama 3.1
  tokenizer's own Jinja template (shipped as ``llmtune/data/bundled/llama3.1_chat_template.jinja``, see
  `llama31_chat_template`): a system block that always carries ``Cutting Knowledge Date: December 2023`` and
  ``Today Date: {date_string}`` (default ``26 Jul 2024``, the template's), tool schemas in the first user turn,
  tool calls as ``{"name": ..., "parameters": ...}``, tool results under the ``ipython`` header.
* tokenizer: ``tokenizer.apply_chat_template``; the answer is what each assistant turn adds to the text.

Tool turns (role ``tool``) are prompt, never trained on; an assistant's tool call is an answer. Which answers
are trained is chosen in `llmtune.data.build_examples` (``train_on``: every assistant turn, the last one, or
everything).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.data.formats import detect_format, record_tools, to_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = ("llama3", "llama3.1", "chatml", "alpaca", "tokenizer")
#: the Llama 3.1 template's default ``date_string``
LLAMA31_DEFAULT_DATE = "26 Jul 2024"
LLAMA31_TOOLS_PREAMBLE = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "Do not use variables.\n\n"
)

LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

#: The Stanford Alpaca prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text, and whether the loss is computed on its tokens."""

    text: str
    trainable: bool


def check_template(template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """Raise `InvalidOptionError` for an unknown template or a tokenizer that lacks the template's tokens."""
    check_choice("template", template, TEMPLATES)
    if tokenizer is None:
        return
    needed = {"llama3": LLAMA3_TOKENS, "llama3.1": LLAMA3_TOKENS, "chatml": CHATML_TOKENS}.get(template, ())
    vocab = tokenizer.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise InvalidOptionError(
            f"template {template!r} needs the special tokens {', '.join(missing)}, which this tokenizer does not "
            "have; use template='tokenizer' (its own chat template) or 'alpaca', or add the tokens first")
    if template == "alpaca" and tokenizer.eos_token is None:
        raise InvalidOptionError("template 'alpaca' ends answers with the eos token, but this tokenizer has none")
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise InvalidOptionError("template 'tokenizer' needs a tokenizer with a chat_template; this one has none "
                                 "(choose 'llama3', 'chatml' or 'alpaca')")


@lru_cache(maxsize=1)
def llama31_chat_template() -> str:
    """Meta's Llama 3.1 Instruct chat template (Jinja), as in its ``tokenizer_config.json``."""
    return resources.files("llmtune.data").joinpath("bundled/llama3.1_chat_template.jinja").read_text("utf-8")


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _llama_tool_call(message: dict[str, Any], where: str) -> str:
    """A Llama 3 assistant tool call: ``{"name": "f", "parameters": {...}}`` (one call per turn)."""
    calls = message["tool_calls"]
    if len(calls) != 1:
        raise ConfigError(f"{where}: Llama 3 templates take one tool call per assistant turn, got {len(calls)}")
    fn = calls[0]["function"]
    return '{"name": "' + fn["name"] + '", "parameters": ' + json.dumps(fn["arguments"], ensure_ascii=False) + "}"


def _llama3(messages: list[dict[str, Any]], where: str = "record") -> list[Segment]:
    """Meta's Llama 3 chat format (contents trimmed, as in the official template); tool results as ``ipython``."""
    segments: list[Segment] = []
    prompt = "<|begin_of_text|>"
    for message in messages:
        role = message["role"]
        if role == "assistant":
            segments.append(Segment(prompt + _header(role), False))
            body = _llama_tool_call(message, where) if message.get("tool_calls") else message["content"].strip()
            segments.append(Segment(body + "<|eot_id|>", True))
            prompt = ""
        elif role == "tool":
            content = message["content"]
            text = content.strip() if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            prompt += _header("ipython") + text + "<|eot_id|>"
        else:
            prompt += _header(role) + message["content"].strip() + "<|eot_id|>"
    return segments


def _llama31(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, date_string: str,
             where: str = "record") -> list[Segment]:
    """Llama 3.1: what its Jinja template renders (custom tools in the first user turn, no builtin tools)."""
    messages = list(messages)
    system = messages.pop(0)["content"].strip() if messages[0]["role"] == "system" else ""
    prompt = "<|begin_of_text|>" + _header("system") + ("Environment: ipython\n" if tools is not None else "")
    prompt += f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system}<|eot_id|>"
    if tools is not None:
        first = messages.pop(0)["content"].strip()
        schemas = "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools)
        prompt += _header("user") + LLAMA31_TOOLS_PREAMBLE + schemas + first + "<|eot_id|>"
    segments: list[Segment] = []
    for message in messages:
        role = message["role"]
        if role == "assistant":
            segments.append(Segment(prompt + _header(role), False))
            body = _llama_tool_call(message, where) if message.get("tool_calls") else message["content"].strip()
            segments.append(Segment(body + "<|eot_id|>", True))
            prompt = ""
        elif role == "tool":  # the template JSON-encodes any content (a string is "iterable" to Jinja)
            prompt += _header("ipython") + json.dumps(message["content"], ensure_ascii=False) + "<|eot_id|>"
        else:
            prompt += _header(role) + message["content"].strip() + "<|eot_id|>"
    return segments


def _chatml_calls(message: dict[str, Any]) -> str:
    """Assistant content plus its tool calls as ``<tool_call>`` JSON blocks (the Hermes / Qwen2.5 convention)."""
    parts = [message["content"]] if message["content"] else []
    for call in message.get("tool_calls", []):
        fn = call["function"]
        body = json.dumps({"name": fn["name"], "arguments": fn["arguments"]}, ensure_ascii=False)
        parts.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(parts)


def _chatml(messages: list[dict[str, Any]]) -> list[Segment]:
    """ChatML: each turn `<|im_start|>role\\ncontent<|im_end|>\\n`; an answer ends at its `<|im_end|>`."""
    segments: list[Segment] = []
    prompt = ""
    for message in messages:
        if message["role"] == "assistant":
            segments.append(Segment(prompt + "<|im_start|>assistant\n", False))
            segments.append(Segment(_chatml_calls(message) + "<|im_end|>", True))
            prompt = "\n"
        else:
            content = message["content"]
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            prompt += f"<|im_start|>{message['role']}\n{text}<|im_end|>\n"
    return segments


def _alpaca(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[Segment]:
    """Stanford Alpaca: the instruction (and input) prompt, the output plus eos; chat turns as instructions."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    if detect_format(record) == "instruction":
        if record.get("input"):
            prompt = ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])
        if record.get("system"):
            prompt = record["system"] + prompt[prompt.index("\n\n"):]
        return [Segment(bos + prompt, False), Segment(record["output"] + eos, True)]
    # A chat record: the first user turn is the instruction; later turns continue the same pattern.
    messages = to_messages(record)
    if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise ConfigError("template 'alpaca' has no tool turns; use 'llama3.1', 'llama3', 'chatml' or 'tokenizer'")
    preamble = ALPACA_PROMPT_NO_INPUT[:ALPACA_PROMPT_NO_INPUT.index("\n\n")]
    if messages[0]["role"] == "system":
        preamble = messages.pop(0)["content"]
    segments: list[Segment] = []
    prompt = bos + preamble
    for message in messages:
        if message["role"] == "user":
            prompt += f"\n\n### Instruction:\n{message['content']}\n\n### Response:\n"
        else:
            segments.append(Segment(prompt, False))
            segments.append(Segment(message["content"] + eos, True))
            prompt = ""
    return segments


#: End-of-turn tokens of the templates llmtune renders (llama3/llama3.1, chatml) and Llama 3's end of text.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>")


def _stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """End-of-answer tokens the tokenizer knows: eos, then each of `END_OF_TURN_TOKENS` in its vocabulary."""
    vocab = tokenizer.get_vocab()
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    return tokens + [t for t in END_OF_TURN_TOKENS if t in vocab and t not in tokens]


def any_template_stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids that end an answer under any of llmtune's templates: eos first, then the end-of-turn tokens known."""
    ids: list[int] = [int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for token in _stop_tokens(tokenizer):
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    return ids


def _from_tokenizer(messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, where: str,
                    tools: list[dict[str, Any]] | None = None) -> list[Segment]:
    """The tokenizer's chat template, split into turns by rendering growing prefixes of the conversation."""

    def render(msgs: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False,  # type: ignore[arg-type]
                                             add_generation_prompt=generation_prompt)
        return str(text)

    stops = _stop_tokens(tokenizer)
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ConfigError(f"{where}: the tokenizer's chat template does not render turn {i} as a continuation "
                              "of the earlier turns, so prompt and answer cannot be separated; use 'llama3', "
                              "'chatml' or 'alpaca'")
        answer = full[len(prompt):]
        _check_rendered_answer(message, answer, stops, where, i)
        if not any(stop in answer for stop in stops) and tokenizer.eos_token:
            answer += tokenizer.eos_token
        segments.append(Segment(prompt[len(done):], False))
        segments.append(Segment(answer, True))
        done = prompt + answer
    return segments


def _check_rendered_answer(message: dict[str, Any], answer: str, stops: list[str], where: str, turn: int) -> None:
    """The tokenizer's template rendered what the turn says: every tool call's name, and some text for content
    (a template that ignores ``tool_calls`` would otherwise train the call as an empty answer)."""
    bare = answer
    for stop in stops:
        bare = bare.replace(stop, "")
    missing = [c["function"]["name"] for c in message.get("tool_calls") or [] if c["function"]["name"] not in bare]
    if missing:
        raise ConfigError(f"{where}: turn {turn}: the tokenizer's chat template ignores 'tool_calls': it renders "
                          f"the answer as {bare.strip()!r}, without the call to {missing[0]!r}, and the call would "
                          "train as that; use template 'llama3.1' or 'chatml', which render tool calls")
    if str(message.get("content") or "").strip() and not bare.strip():
        raise ConfigError(f"{where}: turn {turn}: the tokenizer's chat template renders this assistant turn as an "
                          "empty answer; use template 'llama3', 'llama3.1' or 'chatml'")


def with_system_prompt(record: dict[str, Any], system_prompt: str | None, where: str = "record") -> dict[str, Any]:
    """The record with ``system_prompt`` as its system turn, unless it has one (or is a text record)."""
    if not system_prompt:
        return record
    kind = detect_format(record, where)
    if kind == "text" or record.get("system"):
        return record
    if kind == "instruction":
        return {**record, "system": system_prompt}
    turns = record.get("messages", record.get("conversations"))
    first = turns[0] if isinstance(turns, list) and turns else {}
    if isinstance(first, dict) and (first.get("role") == "system" or first.get("from") == "system"):
        return record
    return {**record, "system": system_prompt}


def render_segments(
    record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase, *, where: str = "record",
    system_prompt: str | None = None, date_string: str = LLAMA31_DEFAULT_DATE,
) -> list[Segment]:
    """The record as prompt/answer segments under `template` (a text record is one trainable segment).

    ``system_prompt``: used when the record has no system turn. ``date_string``: the Llama 3.1 header's date.
    """
    check_template(template)
    record = with_system_prompt(record, system_prompt, where)
    kind = detect_format(record, where)
    if kind == "text":
        bos = tokenizer.bos_token or ""
        return [Segment(bos, False), Segment(record["text"] + (tokenizer.eos_token or ""), True)]
    if template == "alpaca":
        return _alpaca(record, tokenizer)
    messages = to_messages(record, where)
    tools = record_tools(record, where)
    if tools is not None and template in ("llama3", "chatml"):
        raise ConfigError(f"{where}: field 'tools': template {template!r} has no place for tool schemas; use "
                          "'llama3.1' or 'tokenizer' (its own chat template)")
    if template == "llama3":
        return _llama3(messages, where)
    if template == "llama3.1":
        return _llama31(messages, tools, date_string, where)
    if template == "chatml":
        return _chatml(messages)
    return _from_tokenizer(messages, tokenizer, where, tools)


def render_prompt(record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase,
                  **kwargs: Any) -> tuple[str, str]:
    """(prompt up to and including the last answer's header, that answer's plain text) — for generation and eval.

    The prompt is what to feed the model (tokenize with ``add_special_tokens=False``); the answer is the reference
    text without the end-of-answer token. A text record has no prompt: ("<bos>", its text). ``kwargs``: those of
    `render_segments`.
    """
    kind = detect_format(record)
    segments = render_segments(record, template, tokenizer, **kwargs)
    prompt = "".join(s.text for s in segments[:-1])
    if kind == "text":
        return prompt, record["text"]
    last = to_messages(record)[-1]
    if last.get("tool_calls"):
        return prompt, json.dumps([c["function"] for c in last["tool_calls"]], ensure_ascii=False)
    return prompt, last["content"]


def render_text(record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> str:
    """The full training text of a record under `template` (prompt and answers concatenated)."""
    return "".join(s.text for s in render_segments(record, template, tokenizer, **kwargs))


def stop_token_ids(template: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer under `template` (pass as ``generate(eos_token_id=...)``); eos always included."""
    check_template(template)
    own = {"llama3": ["<|eot_id|>"], "llama3.1": ["<|eot_id|>"], "chatml": ["<|im_end|>"], "alpaca": []}.get(template)
    tokens = _stop_tokens(tokenizer) if own is None else own + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for token in tokens:
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise InvalidOptionError(f"the tokenizer has no token that ends an answer under template {template!r}")
    return ids
