"""Chunked cross-entropy equals transformers' own causal-LM loss and its gradients, without full fp32 logits."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llmtune.trainers._loss import chunked_causal_lm_loss, model_loss  # noqa: E402


def _model(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=301, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _batch() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 301, (3, 17), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100           # a prompt: no loss
    labels[2, 12:] = -100          # padding of a shorter row
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("chunk", [0, 1, 5, 7, 10_000])
def test_equals_the_plain_loss_and_gradients(chunk: int) -> None:
    model, batch = _model(), _batch()
    plain = model(**batch).loss
    plain.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = model_loss(model, batch, chunk_tokens=chunk)
    mean = total / count
    mean.backward()
    assert int(count) == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(mean, plain, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], atol=1e-6, rtol=1e-5), name
    assert type(model.lm_head).__name__ == "Linear", "the output projection was not put back"


def test_chunks_do_not_keep_their_logits_for_backward() -> None:
    """With checkpointed chunks, the autograd graph holds no [rows, vocab] tensor of any chunk."""
    hidden = torch.randn(1, 65, 8, requires_grad=True)
    head = torch.nn.Linear(8, 1000, bias=False)
    labels = torch.randint(0, 1000, (1, 65))
    saved: list[tuple[int, ...]] = []

    def pack(t: Any) -> Any:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, _ = chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=16)
    assert not any(len(s) == 2 and s[1] == 1000 and s[0] > 1 for s in saved), saved
    total.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # the unchunked path does keep them (what chunking saves)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=0)
    assert any(len(s) == 2 and s[1] == 1000 for s in saved)


def test_no_labelled_token_gives_zero_and_a_connected_graph() -> None:
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11)
    total, count = chunked_causal_lm_loss(hidden, torch.full((2, 5), -100), head)
    assert float(total.detach()) == 0.0 and int(count) == 0
    total.backward()
    assert hidden.grad is not None


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="do not match"):
        chunked_causal_lm_loss(torch.randn(1, 4, 8), torch.zeros(1, 5, dtype=torch.long), torch.nn.Linear(8, 3))
