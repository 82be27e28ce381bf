"""Packing without contamination: a pack's per-token losses equal its examples' unpacked losses (SDPA, eager)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtune.data import build_examples, collate, pack_examples, split_instructions  # noqa: E402
from llmtune.data.packing import block_causal_mask, packed_attention_kwargs, padding_free  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def examples(tok: Any) -> list[Any]:
    train, _ = split_instructions()
    return build_examples(train[:5], tok, template="llama3", max_length=96)


def model_with(tok: Any, attn: str) -> Any:
    from llmtune.models.tiny import build_tiny_model

    model = build_tiny_model(tok, seed=0, **SMALL)
    model.set_attn_implementation(attn)
    return model.eval()


def token_losses(logits: Any, labels: Any) -> Any:
    """Per-token next-token losses where a label is set (in order)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != -100
    return torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


def unpacked_losses(model: Any, examples: list[Any]) -> Any:
    with torch.no_grad():
        return torch.cat([token_losses(model(input_ids=torch.tensor([e.input_ids])).logits,
                                       torch.tensor([e.labels])) for e in examples])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pack_of_three_has_the_unpacked_per_token_losses(tok: Any, examples: list[Any], attn: str) -> None:
    model = model_with(tok, attn)
    three = examples[:3]
    (pack,) = pack_examples(three, 10_000)
    assert pack.segments == [len(e) for e in three]
    batch = collate([pack], tok.pad_token_id)
    assert batch["position_ids"][0].tolist() == [i for e in three for i in range(len(e))]
    want = unpacked_losses(model, three)
    with torch.no_grad():
        kwargs = packed_attention_kwargs(model, batch["position_ids"])  # what the trainer passes
        assert kwargs["attention_mask"].dtype == (torch.bool if attn == "sdpa" else torch.float32)
        got = token_losses(model(input_ids=batch["input_ids"], **kwargs).logits, batch["labels"])
        # the old way (one causal mask over the pack, positions running on) optimises a different loss
        leaky = token_losses(model(input_ids=batch["input_ids"]).logits, batch["labels"])
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5
    assert (leaky - want).abs().max().item() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_of_packs_and_padding_free(tok: Any, examples: list[Any], attn: str) -> None:
    model = model_with(tok, attn)
    packs = pack_examples(examples, len(examples[0]) + len(examples[1]) + len(examples[2]))
    assert len(packs) >= 2 and len({len(p) for p in packs}) > 1  # rows of different length: padding
    want = unpacked_losses(model, examples)
    batch = collate(packs, tok.pad_token_id)
    with torch.no_grad():
        mask = block_causal_mask(batch["position_ids"], torch.float32)
        got = token_losses(model(input_ids=batch["input_ids"], attention_mask=mask,
                                 position_ids=batch["position_ids"]).logits, batch["labels"])
        flat = padding_free(examples)  # one row, no padding; the mask comes from the restarting position ids
        free = token_losses(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                                  attention_mask=block_causal_mask(flat["position_ids"], torch.float32)).logits,
                            flat["labels"])
    assert (got - want).abs().max().item() <= 1e-5
    assert (free - want).abs().max().item() <= 1e-5


def test_block_mask_shape_and_values() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(pos, torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]


def test_trainer_loss_uses_the_packed_mask(tok: Any, examples: list[Any]) -> None:
    from llmtune.trainers._loss import model_loss

    model = model_with(tok, "sdpa")
    three = examples[:3]
    batch = collate(pack_examples(three, 10_000), tok.pad_token_id)
    with torch.no_grad():
        loss_sum, count = model_loss(model, batch, chunk_tokens=0)
    want = unpacked_losses(model, three)
    assert int(count) == want.numel()
    assert abs(float(loss_sum) - float(want.sum())) <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_finds_boundaries_from_position_ids_only_without_a_cache(tok: Any, examples: list[Any],
                                                                               attn: str) -> None:
    """What the flash-attention varlen path relies on: restarting position ids, no mask (transformers 5.x)."""
    model = model_with(tok, attn)
    want = unpacked_losses(model, examples)
    flat = padding_free(examples)
    with torch.no_grad():
        no_cache = token_losses(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                                      use_cache=False).logits, flat["labels"])
        cached = token_losses(model(input_ids=flat["input_ids"], position_ids=flat["position_ids"],
                                    use_cache=True).logits, flat["labels"])
    assert (no_cache - want).abs().max().item() <= 1e-5
    assert (cached - want).abs().max().item() > 1e-3  # why the trainer builds the mask itself


def test_flash_attention_gets_position_ids_and_no_mask() -> None:
    class Config:
        _attn_implementation = "flash_attention_2"

    class Model:
        config = Config()

    pos = torch.tensor([[0, 1, 0, 1, 2]])
    kwargs = packed_attention_kwargs(Model(), pos)
    assert kwargs["attention_mask"] is None and kwargs["position_ids"] is pos
