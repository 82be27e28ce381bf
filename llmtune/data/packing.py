"""Attention for packed sequences: each packed example attends only to itself (no cross-contamination).

A pack's ``position_ids`` restart at 0 at every example (see `llmtune.data.collate`). From them:

* `block_causal_mask` — the 4D additive mask ``[batch, 1, T, T]`` (0 where query i may attend key j: same
  example and j <= i; the dtype's most negative value elsewhere) that SDPA and eager attention take as is;
* flash-attention varlen needs no mask: with ``attention_mask=None`` transformers reads the example boundaries
  from the position ids (``cu_seqlens`` where a position id restarts);
* `padding_free` — a whole batch as one row without padding (position ids carry the boundaries), for kernels
  that support it.

Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from llmtune.data.examples import Example

if TYPE_CHECKING:
    import torch


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, T]`` index of the packed example each token belongs to (a new one wherever position id is 0)."""
    return (position_ids == 0).long().cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``[batch, 1, T, T]`` mask: causal within each packed example, blocked across examples.

    ``dtype=torch.bool``: True where attention is allowed (SDPA takes it in any compute dtype); a float dtype:
    additive, 0 where allowed and the dtype's most negative value elsewhere (what eager attention adds).
    """
    import torch

    seg = segment_ids(position_ids)
    t = position_ids.shape[-1]
    causal = torch.ones((t, t), dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    if dtype == torch.bool:
        return allowed[:, None, :, :]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None, :, :]


def padding_free(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """One row ``[1, sum of lengths]``: ids, labels and restarting position ids; no padding, no attention mask.

    The first token of every example after the first gets label -100 (as in `pack_examples`).
    """
    import torch

    if not examples:
        raise ValueError("padding_free needs at least one example")
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for k, example in enumerate(examples):
        ids.extend(example.input_ids)
        labels.extend(example.labels if k == 0 else [-100, *example.labels[1:]])
        positions.extend(example.position_ids)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions])}


def packed_attention_kwargs(model: object, position_ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """``attention_mask`` / ``position_ids`` forward arguments for a packed batch under the model's attention.

    flash-attention (varlen): no mask, the boundaries come from the position ids; SDPA: a boolean block mask;
    eager and anything else: the additive fp32 block mask.
    """
    import torch

    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    if "flash" in impl:
        return {"attention_mask": None, "position_ids": position_ids}
    dtype = torch.bool if impl == "sdpa" else torch.float32
    return {"attention_mask": block_causal_mask(position_ids, dtype), "position_ids": position_ids}
