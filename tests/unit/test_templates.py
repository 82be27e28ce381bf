"""Each prompt template's exact text, prompt/answer split, and template/tokenizer checks."""

from __future__ import annotations

from typing import Any

import pytest

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.data import TEMPLATES, render_prompt, render_segments, render_text, stop_token_ids

#: The chat template of Meta-Llama-3-8B-Instruct (tokenizer_config.json), verbatim.
META_LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ORDER = {"instruction": "Translate this kopitiam order into plain English.", "input": "Teh C Siew Dai",
         "output": "Tea with evaporated milk, less sweet."}
QUESTION = {"instruction": "What is Kopi O Kosong?", "input": "", "output": "Black coffee, no sugar."}
CHAT = {"messages": [
    {"role": "system", "content": "You are a kopitiam uncle."},
    {"role": "user", "content": "Kopi O?"},
    {"role": "assistant", "content": "Black coffee."},
    {"role": "user", "content": "Kosong?"},
    {"role": "assistant", "content": "No sugar."},
]}




def test_templates_tuple() -> None:
    assert TEMPLATES == ("llama3", "llama3.1", "chatml", "alpaca", "tokenizer")


def test_llama3_exact(tok: Any) -> None:
    assert render_text(ORDER, "llama3", tok) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        "Translate this kopitiam order into plain English.\n\nTeh C Siew Dai<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "Tea with evaporated milk, less sweet.<|eot_id|>"
    )
    assert render_prompt(QUESTION, "llama3", tok) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is Kopi O Kosong?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "Black coffee, no sugar.",
    )


def test_llama3_multi_turn_with_system_exact(tok: Any) -> None:
    segments = render_segments(CHAT, "llama3", tok)
    assert [(s.text, s.trainable) for s in segments] == [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a kopitiam uncle.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nKopi O?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("Black coffee.<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\nKosong?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("No sugar.<|eot_id|>", True),
    ]


def test_llama3_equals_metas_own_chat_template(tok: Any) -> None:
    meta = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<|begin_of_text|>",
                         eos_token="<|eot_id|>", pad_token="<|pad|>")
    meta.chat_template = META_LLAMA3_CHAT_TEMPLATE
    padded = {"messages": [{**m, "content": f" {m['content']}\n"} for m in CHAT["messages"]]}  # Meta trims
    for record in (ORDER, QUESTION, CHAT, padded):
        assert render_text(record, "tokenizer", meta) == render_text(record, "llama3", tok)
        assert render_prompt(record, "tokenizer", meta)[0] == render_prompt(record, "llama3", tok)[0]


def test_chatml_exact(tok: Any) -> None:
    assert render_text(CHAT, "chatml", tok) == (
        "<|im_start|>system\nYou are a kopitiam uncle.<|im_end|>\n"
        "<|im_start|>user\nKopi O?<|im_end|>\n"
        "<|im_start|>assistant\nBlack coffee.<|im_end|>\n"
        "<|im_start|>user\nKosong?<|im_end|>\n"
        "<|im_start|>assistant\nNo sugar.<|im_end|>"
    )
    assert [s.trainable for s in render_segments(CHAT, "chatml", tok)] == [False, True, False, True]
    assert render_prompt(ORDER, "chatml", tok) == (
        "<|im_start|>user\nTranslate this kopitiam order into plain English.\n\nTeh C Siew Dai<|im_end|>\n"
        "<|im_start|>assistant\n",
        "Tea with evaporated milk, less sweet.",
    )


def test_alpaca_exact_with_and_without_input(tok: Any) -> None:
    assert render_text(ORDER, "alpaca", tok) == (
        "<|begin_of_text|>Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate this kopitiam order into plain English.\n\n"
        "### Input:\nTeh C Siew Dai\n\n### Response:\nTea with evaporated milk, less sweet.<|end_of_text|>"
    )
    assert render_prompt(QUESTION, "alpaca", tok) == (
        "<|begin_of_text|>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nWhat is Kopi O Kosong?\n\n### Response:\n",
        "Black coffee, no sugar.",
    )


def test_alpaca_chat_and_system(tok: Any) -> None:
    assert render_text(CHAT, "alpaca", tok) == (
        "<|begin_of_text|>You are a kopitiam uncle.\n\n### Instruction:\nKopi O?\n\n### Response:\n"
        "Black coffee.<|end_of_text|>\n\n### Instruction:\nKosong?\n\n### Response:\nNo sugar.<|end_of_text|>"
    )
    record = {**QUESTION, "system": "Answer briefly."}
    assert render_prompt(record, "alpaca", tok)[0] == (
        "<|begin_of_text|>Answer briefly.\n\n### Instruction:\nWhat is Kopi O Kosong?\n\n### Response:\n")


def test_tokenizer_template_uses_apply_chat_template(tok: Any) -> None:
    # The tiny tokenizer's own template is ChatML, which ends every turn with a newline.
    assert render_text(CHAT, "tokenizer", tok) == render_text(CHAT, "chatml", tok) + "\n"
    assert render_text(CHAT, "tokenizer", tok) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    segments = render_segments(CHAT, "tokenizer", tok)
    assert [(s.text, s.trainable) for s in segments][1] == ("Black coffee.<|im_end|>\n", True)
    assert render_prompt(CHAT, "tokenizer", tok)[0] == tok.apply_chat_template(
        CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True)


def test_tokenizer_template_without_end_token_gets_eos(tok: Any) -> None:
    bare = tok.__class__(tokenizer_object=tok.backend_tokenizer, bos_token="<|begin_of_text|>",
                         eos_token="<|end_of_text|>", pad_token="<|pad|>")
    bare.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    segments = render_segments(QUESTION, "tokenizer", bare)
    assert [(s.text, s.trainable) for s in segments] == [
        ("user: What is Kopi O Kosong?\nassistant: ", False), ("Black coffee, no sugar.\n<|end_of_text|>", True)]


def test_non_incremental_chat_template_is_an_error(tok: Any) -> None:
    odd = tok.__class__(tokenizer_object=tok.backend_tokenizer, eos_token="<|end_of_text|>")
    odd.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="does not render turn 1 as a continuation"):
        render_segments(QUESTION, "tokenizer", odd)


def test_text_record_is_all_answer(tok: Any) -> None:
    record = {"text": "Kopi is coffee."}
    for template in TEMPLATES:
        assert [(s.text, s.trainable) for s in render_segments(record, template, tok)] == [
            ("<|begin_of_text|>", False), ("Kopi is coffee.<|end_of_text|>", True)]
    assert render_prompt(record, "llama3", tok) == ("<|begin_of_text|>", "Kopi is coffee.")


def test_unknown_template_and_missing_tokens(tok: Any) -> None:
    from llmtune.data.templates import check_template

    with pytest.raises(InvalidOptionError, match="Did you mean 'llama3'"):
        render_segments(QUESTION, "llama-3", tok)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(InvalidOptionError, match=r"needs the special tokens <\|begin_of_text\|>.*'tokenizer'"):
        check_template("llama3", plain)
    with pytest.raises(InvalidOptionError, match=r"<\|im_start\|>, <\|im_end\|>"):
        check_template("chatml", plain)
    with pytest.raises(InvalidOptionError, match="has none"):
        check_template("alpaca", plain)
    with pytest.raises(InvalidOptionError, match="chat_template"):
        check_template("tokenizer", plain)
    for template in TEMPLATES:
        check_template(template, tok)


def test_stop_token_ids(tok: Any) -> None:
    ids = tok.convert_tokens_to_ids
    assert stop_token_ids("llama3", tok) == ids(["<|eot_id|>", "<|end_of_text|>"])
    assert stop_token_ids("chatml", tok) == ids(["<|im_end|>", "<|end_of_text|>"])
    assert stop_token_ids("alpaca", tok) == ids(["<|end_of_text|>"])
    assert stop_token_ids("tokenizer", tok) == ids(["<|end_of_text|>", "<|eot_id|>", "<|im_end|>"])


def test_tokenizer_template_that_ignores_tool_calls_is_refused(tok):
    """Template 'tokenizer' with a chat template that drops ``tool_calls`` would train the call as an empty
    answer (main did, silently): refused, naming the turn and the function; one that renders the call is used."""
    import copy

    from llmtune.core.errors import ConfigError
    from llmtune.data.templates import render_segments

    call = {"type": "function", "function": {"name": "menu_price", "arguments": {"drink": "Kopi C"}}}
    record = {"messages": [{"role": "user", "content": "How much is Kopi C?"},
                           {"role": "assistant", "content": "", "tool_calls": [call]},
                           {"role": "tool", "content": "1.60"}, {"role": "assistant", "content": "$1.60."}]}
    with pytest.raises(ConfigError, match=r"tools.jsonl:2: turn 1: the tokenizer's chat template ignores "
                                          r"'tool_calls'.*'menu_price'"):
        render_segments(record, "tokenizer", tok, where="tools.jsonl:2")
    renders = copy.deepcopy(tok)
    renders.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                             "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}</call>{% endfor %}"
                             "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    answers = [s.text for s in render_segments(record, "tokenizer", renders) if s.trainable]
    assert "<call>menu_price</call>" in answers[0]
