"""Tokenized examples: loss only on answers, explicit truncation, packing, and collation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from llmtune.core.errors import ConfigError, InvalidOptionError
from llmtune.data import (
    IGNORE_INDEX,
    TEMPLATES,
    Example,
    build_examples,
    bundled_instructions,
    collate,
    pack_examples,
    render_prompt,
    render_text,
)

ORDER = {"instruction": "Translate this kopitiam order into plain English.", "input": "Teh C Siew Dai",
         "output": "Tea with evaporated milk, less sweet."}
CHAT = {"messages": [
    {"role": "user", "content": "Kopi O?"}, {"role": "assistant", "content": "Black coffee."},
    {"role": "user", "content": "Kosong?"}, {"role": "assistant", "content": "No sugar."},
]}
TEXT = {"text": "A kopitiam is a coffee shop."}


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def concat(lists: Any) -> list[int]:
    """Lists joined end to end."""
    return [token for ids in lists for token in ids]


def trained_text(tok: Any, example: Example) -> str:
    """The decoded tokens that carry a label."""
    return str(tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != IGNORE_INDEX]))


@pytest.mark.parametrize("template", TEMPLATES)
def test_loss_only_on_the_answer(tok: Any, template: str) -> None:
    (example,) = build_examples([ORDER], tok, template=template)
    assert tok.decode(example.input_ids) == render_text(ORDER, template, tok)
    end = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>", "alpaca": "<|end_of_text|>", "tokenizer": "<|im_end|>\n"}
    assert trained_text(tok, example) == ORDER["output"] + end[template]
    prompt, _ = render_prompt(ORDER, template, tok)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert example.input_ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_multi_turn_chat_trains_on_every_assistant_turn(tok: Any) -> None:
    (example,) = build_examples([CHAT], tok, template="llama3")
    assert trained_text(tok, example) == "Black coffee.<|eot_id|>No sugar.<|eot_id|>"
    (chatml,) = build_examples([CHAT], tok, template="chatml")
    assert trained_text(tok, chatml) == "Black coffee.<|im_end|>No sugar.<|im_end|>"


def test_text_format_trains_on_everything_but_bos(tok: Any) -> None:
    (example,) = build_examples([TEXT], tok, template="llama3")
    assert example.input_ids[0] == tok.bos_token_id and example.labels[0] == IGNORE_INDEX
    assert example.labels[1:] == example.input_ids[1:]
    assert example.input_ids[-1] == tok.eos_token_id


def test_train_on_prompt_labels_everything(tok: Any) -> None:
    (example,) = build_examples([ORDER], tok, template="alpaca", train_on_prompt=True)
    assert example.labels == example.input_ids
    assert example.num_trained == len(example) - 1


def test_truncation_warns_with_count_and_keeps_the_start(tok: Any) -> None:
    long_text = {"text": "Kopi O Kosong is black coffee, no sugar. " * 20}
    records = [ORDER, long_text, TEXT]
    with pytest.warns(UserWarning, match=r"^records: 1 of 3 examples were longer than max_length=64 tokens") as rec:
        examples = build_examples(records, tok, template="llama3", max_length=64)
    assert "left out" not in str(rec[0].message)
    assert [len(e) for e in examples][1] == 64
    full = tok(long_text["text"], add_special_tokens=False)["input_ids"]
    assert examples[1].input_ids == [tok.bos_token_id, *full[:63]]
    assert [e.where for e in examples] == ["records[0]", "records[1]", "records[2]"]


def test_truncation_that_removes_the_answer_is_reported(tok: Any, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [ORDER, {**ORDER, "input": "Kopi " * 100}, TEXT]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.warns(UserWarning) as rec:
        examples = build_examples(path, tok, template="llama3", max_length=48)
    message = str(rec[0].message)
    assert f"{path}: 1 of 3 examples were longer" in message
    assert f"1 of them lost their whole answer and were left out ({path}:2)" in message
    assert [e.where for e in examples] == [f"{path}:1", f"{path}:3"]


def test_truncation_error_mode_names_the_record(tok: Any) -> None:
    with pytest.raises(ConfigError, match=r"^mine\[1\]: \d+ tokens, longer than max_length=32"):
        build_examples([TEXT, {"text": "kopi " * 50}], tok, max_length=32, truncation="error", source="mine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_examples([TEXT], tok, max_length=32, truncation="error")


def test_bad_options(tok: Any) -> None:
    with pytest.raises(InvalidOptionError, match="truncation"):
        build_examples([TEXT], tok, truncation="cut")
    with pytest.raises(InvalidOptionError, match="max_length"):
        build_examples([TEXT], tok, max_length=0)
    with pytest.raises(InvalidOptionError, match="template"):
        build_examples([TEXT], tok, template="vicuna")
    with pytest.raises(ConfigError, match=r"records\[0\]: field 'output': missing"):
        build_examples([{"instruction": "x"}], tok)
    with pytest.raises(ValueError, match="differ in length"):
        Example([1, 2], [1])


def test_bundled_set_builds_and_fits(tok: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        examples = build_examples(bundled_instructions(), tok, template="llama3", max_length=128)
    assert len(examples) == 450
    assert max(len(e) for e in examples) < 64  # short: fast to fine-tune


def test_packing(tok: Any) -> None:
    examples = build_examples([ORDER, CHAT, TEXT, ORDER], tok, template="chatml")
    lengths = [len(e) for e in examples]
    limit = lengths[0] + lengths[1] + 1
    packs = pack_examples(examples, limit)
    assert [len(p) for p in packs] == [lengths[0] + lengths[1], lengths[2] + lengths[3]]
    assert concat(p.input_ids for p in packs) == concat(e.input_ids for e in examples)
    first = packs[0]
    assert first.labels[: lengths[0]] == examples[0].labels
    assert first.labels[lengths[0]] == IGNORE_INDEX  # nothing learned across the boundary
    assert first.labels[lengths[0] + 1:] == examples[1].labels[1:]
    # With the prompt trained on too, the boundary token is still masked.
    full = build_examples([TEXT, TEXT], tok, train_on_prompt=True)
    (pack,) = pack_examples(full, 1000)
    assert pack.labels[len(full[0])] == IGNORE_INDEX
    assert pack_examples(examples, 10_000)[0].input_ids == concat(e.input_ids for e in examples)
    with pytest.raises(ConfigError, match="do not fit a pack"):
        pack_examples(examples, min(lengths) - 1)


def test_collate_pads_right(tok: Any) -> None:
    examples = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])]
    batch = collate(examples, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate(examples, 0, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="at least one"):
        collate([], 0)
    with pytest.raises(InvalidOptionError, match="pad_token_id"):
        collate(examples, None)  # type: ignore[arg-type]


def test_collated_batch_gives_the_same_loss_as_unpadded(tok: Any) -> None:
    from llmtune.models.tiny import build_tiny_model

    model = build_tiny_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    examples = build_examples([ORDER, CHAT], tok, template="llama3")
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        single = model(input_ids=torch.tensor([examples[1].input_ids])).logits
    n = len(examples[1])
    assert torch.allclose(logits[1, :n], single[0], atol=1e-5)
