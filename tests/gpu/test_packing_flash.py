"""Packing on flash-attention (varlen through restarting position ids): per-token losses equal the unpacked ones."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("flash_attn")

from llmtune.data import build_examples, collate, pack_examples, split_instructions  # noqa: E402
from llmtune.data.packing import packed_attention_kwargs  # noqa: E402


def token_losses(logits: Any, labels: Any) -> Any:
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != -100
    return torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


def test_flash_attention_pack_of_three_matches_unpacked(tok: Any) -> None:
    from llmtune.models.tiny import build_tiny_model

    train, _ = split_instructions()
    three = build_examples(train[:3], tok, max_length=96)
    model = build_tiny_model(tok, seed=0).to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    model.eval()
    batch = collate(pack_examples(three, 10_000), tok.pad_token_id)
    kwargs = packed_attention_kwargs(model, batch["position_ids"].cuda())
    assert kwargs["attention_mask"] is None
    with torch.no_grad():
        got = token_losses(model(input_ids=batch["input_ids"].cuda(), use_cache=False, **kwargs).logits,
                           batch["labels"].cuda())
        want = torch.cat([token_losses(model(input_ids=torch.tensor([e.input_ids], device="cuda"),
                                             use_cache=False).logits, torch.tensor([e.labels], device="cuda"))
                          for e in three])
    assert (got - want).abs().max().item() <= 2e-2  # bf16 kernels: one rounding step of the logits
