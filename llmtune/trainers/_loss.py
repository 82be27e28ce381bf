"""Causal-LM loss without a full ``[tokens, vocab]`` fp32 logits tensor (chunked cross-entropy).

Plain transformers computes ``lm_head(hidden)`` for every position, then upcasts the logits to fp32 inside the
loss: at a 128k vocabulary that is the largest activation of a LoRA step. Here only the positions that carry a
label are projected, a chunk of ``chunk_tokens`` rows at a time, and each chunk is wrapped in
``torch.utils.checkpoint`` so backward recomputes its logits instead of keeping them: the peak extra memory
is one chunk's logits (``chunk_tokens x vocab`` fp32) instead of all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmtune.data.examples import IGNORE_INDEX


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of one chunk of rows."""
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    *,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies and the number of labelled tokens.

    ``hidden``: ``[batch, seq, dim]`` final hidden states (after the last norm); ``labels``: ``[batch, seq]``
    with ``-100`` where no loss is taken (the shift by one is done here, as transformers does); ``head``: the
    output projection (``lm_head``, any module, LoRA-wrapped or quantized). ``chunk_tokens <= 0`` projects
    every labelled row at once (no checkpointing), which is still cheaper than projecting every position.
    The mean loss is ``sum / count``; returning both lets gradient accumulation weight every token equally.
    """
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match labels {tuple(labels.shape)}")
    shift_hidden = hidden[:, :-1, :]
    shift_labels = labels[:, 1:].to(hidden.device)
    mask = shift_labels != IGNORE_INDEX
    rows = shift_hidden[mask]  # [n, dim]: only the positions that are scored
    targets = shift_labels[mask]
    count = mask.sum()
    if rows.shape[0] == 0:
        # keep the graph connected (DDP expects every rank to produce gradients) but contribute zero
        return hidden.sum() * 0.0, count
    if chunk_tokens <= 0 or rows.shape[0] <= chunk_tokens:
        return _chunk_loss(head, rows, targets), count
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        h = rows[start:start + chunk_tokens]
        t = targets[start:start + chunk_tokens]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total, count


class _Capture(nn.Module):
    """Stands in for ``lm_head`` during a forward: records the hidden states and returns them unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden


def output_head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """``(parent, attribute, module)`` of the model's output projection (``lm_head`` for Llama-like models)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (get_output_embeddings() is None)")
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is head:
                return module, child_name, head
    raise TypeError(f"could not locate the output projection of {type(model).__name__} among its modules")


@contextlib.contextmanager
def capture_hidden(model: nn.Module) -> Iterator[tuple[_Capture, nn.Module]]:
    """Within the block, the model's forward skips the output projection; yields ``(capture, real_head)``."""
    parent, attr, head = output_head(model)
    capture = _Capture()
    setattr(parent, attr, capture)
    try:
        yield capture, head
    finally:
        setattr(parent, attr, head)


def model_loss(model: nn.Module, batch: dict[str, torch.Tensor], *, chunk_tokens: int = 1024,
               forward_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` (a transformers or PEFT causal LM) on ``batch`` and return ``(loss_sum, n_tokens)``.

    Works for prompt tuning too: the virtual tokens PEFT prepends get no label. A packed batch (with
    ``position_ids`` from `llmtune.data.collate`) gets the per-example attention of `llmtune.data.packing`.
    """
    labels = batch["labels"]
    attention: dict[str, Any] = {"attention_mask": batch.get("attention_mask")}
    if batch.get("position_ids") is not None:  # packed: each example attends only to itself
        from llmtune.data.packing import packed_attention_kwargs

        attention = packed_attention_kwargs(model, batch["position_ids"])
    with capture_hidden(model) as (capture, head):
        model(input_ids=batch["input_ids"], use_cache=False, **attention, **(forward_kwargs or {}))
    hidden = capture.hidden
    if hidden is None:
        raise RuntimeError("the model's forward never called its output projection")
    extra = hidden.shape[1] - labels.shape[1]
    if extra > 0:  # soft prompts prepended by PEFT prompt tuning
        pad = labels.new_full((labels.shape[0], extra), IGNORE_INDEX)
        labels = torch.cat([pad, labels], dim=1)
    return chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=chunk_tokens)
