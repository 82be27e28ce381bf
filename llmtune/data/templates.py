"""Prompt templates: ``llama3`` (Meta's special tokens), ``chatml``, ``alpaca`` (Stanford), ``tokenizer`` (its own).

A record renders as a list of `Segment`s — text plus whether the model is trained on it. Answers (assistant
turns, or a text record's whole text) are trainable and end with the template's end-of-answer token; everything
else (system, user turns, headers) is prompt. Concatenating the segments gives the exact training text:

* llama3: ``<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>``
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` + answer ``{assistant}<|eot_id|>`` (contents trimmed,
  as in Meta's template; a system turn, if any, comes first in the same form).
* chatml: ``<|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n`` + answer ``{assistant}<|im_end|>``.
* alpaca: the Stanford Alpaca prompt (with or without ``### Input:``), answer ``{output}`` + the eos token.
* tokenizer: ``tokenizer.apply_chat_template``; the answer is what each assistant turn adds to the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.core.options import check_choice
from llmtune.data.formats import detect_format, to_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES = ("llama3", "chatml", "alpaca", "tokenizer")

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
    needed = {"llama3": LLAMA3_TOKENS, "chatml": CHATML_TOKENS}.get(template, ())
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


def _llama3(messages: list[dict[str, str]]) -> list[Segment]:
    """Meta's Llama 3 chat format (contents trimmed, as in the official template)."""
    segments: list[Segment] = []
    prompt = "<|begin_of_text|>"
    for message in messages:
        header = f"<|start_header_id|>{message['role']}<|end_header_id|>\n\n"
        if message["role"] == "assistant":
            segments.append(Segment(prompt + header, False))
            segments.append(Segment(message["content"].strip() + "<|eot_id|>", True))
            prompt = ""
        else:
            prompt += header + message["content"].strip() + "<|eot_id|>"
    return segments


def _chatml(messages: list[dict[str, str]]) -> list[Segment]:
    """ChatML: each turn `<|im_start|>role\\ncontent<|im_end|>\\n`; an answer ends at its `<|im_end|>`."""
    segments: list[Segment] = []
    prompt = ""
    for message in messages:
        if message["role"] == "assistant":
            segments.append(Segment(prompt + "<|im_start|>assistant\n", False))
            segments.append(Segment(message["content"] + "<|im_end|>", True))
            prompt = "\n"
        else:
            prompt += f"<|im_start|>{message['role']}\n{message['content']}<|im_end|>\n"
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


def _stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """End-of-answer tokens the tokenizer knows: eos, `<|eot_id|>`, `<|im_end|>`."""
    vocab = tokenizer.get_vocab()
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    return tokens + [t for t in ("<|eot_id|>", "<|im_end|>") if t in vocab and t not in tokens]


def _from_tokenizer(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str) -> list[Segment]:
    """The tokenizer's chat template, split into turns by rendering growing prefixes of the conversation."""

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
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
        if not any(stop in answer for stop in stops) and tokenizer.eos_token:
            answer += tokenizer.eos_token
        segments.append(Segment(prompt[len(done):], False))
        segments.append(Segment(answer, True))
        done = prompt + answer
    return segments


def render_segments(
    record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase, *, where: str = "record"
) -> list[Segment]:
    """The record as prompt/answer segments under `template` (a text record is one trainable segment)."""
    check_template(template)
    kind = detect_format(record, where)
    if kind == "text":
        bos = tokenizer.bos_token or ""
        return [Segment(bos, False), Segment(record["text"] + (tokenizer.eos_token or ""), True)]
    if template == "alpaca":
        return _alpaca(record, tokenizer)
    messages = to_messages(record)
    if template == "llama3":
        return _llama3(messages)
    if template == "chatml":
        return _chatml(messages)
    return _from_tokenizer(messages, tokenizer, where)


def render_prompt(record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(prompt up to and including the last answer's header, that answer's plain text) — for generation and eval.

    The prompt is what to feed the model (tokenize with ``add_special_tokens=False``); the answer is the reference
    text without the end-of-answer token. A text record has no prompt: ("<bos>", its text).
    """
    kind = detect_format(record)
    segments = render_segments(record, template, tokenizer)
    prompt = "".join(s.text for s in segments[:-1])
    if kind == "text":
        return prompt, record["text"]
    return prompt, to_messages(record)[-1]["content"]


def render_text(record: dict[str, Any], template: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The full training text of a record under `template` (prompt and answers concatenated)."""
    return "".join(s.text for s in render_segments(record, template, tokenizer))


def stop_token_ids(template: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer under `template` (pass as ``generate(eos_token_id=...)``); eos always included."""
    check_template(template)
    own = {"llama3": ["<|eot_id|>"], "chatml": ["<|im_end|>"], "alpaca": []}.get(template)
    tokens = _stop_tokens(tokenizer) if own is None else own + ([tokenizer.eos_token] if tokenizer.eos_token else [])
    vocab = tokenizer.get_vocab()
    ids: list[int] = []
    for token in tokens:
        if token in vocab and vocab[token] not in ids:
            ids.append(int(vocab[token]))
    if not ids:
        raise InvalidOptionError(f"the tokenizer has no token that ends an answer under template {template!r}")
    return ids
