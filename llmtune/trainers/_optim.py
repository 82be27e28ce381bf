"""Optimizers by name (the names `llmtune.memory.estimate_training` knows) and LR schedules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmtune.core.errors import BackendUnavailableError, MissingDependencyError


def build_optimizer(name: str, params: Sequence[Any], *, lr: float, weight_decay: float) -> Any:
    """``adamw`` (torch), ``adamw_8bit`` (bitsandbytes' AdamW8bit), ``sgd``, ``sgd_momentum`` (momentum 0.9).

    ``params``: tensors, or parameter groups (dicts with their own ``lr`` / ``weight_decay``, as `loraplus_groups`).
    """
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise MissingDependencyError("optimizer 'adamw_8bit' needs bitsandbytes: pip install 'llmtune[bnb]'"
                                         ) from exc
        try:
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        except (RuntimeError, NotImplementedError) as exc:  # pragma: no cover - depends on the bnb build
            raise BackendUnavailableError(f"optimizer 'adamw_8bit': bitsandbytes cannot run it here: {exc}") from exc
    raise ValueError(f"unknown optimizer {name!r}")


def loraplus_groups(model: Any, *, lr: float, ratio: float, weight_decay: float) -> list[dict[str, Any]]:
    """LoRA+ parameter groups (Hayou et al. 2024) by PEFT's rule (``peft.optimizers.create_loraplus_optimizer``):
    ``lora_B`` and 1-D adapter parameters at ``lr * ratio``, the rest (``lora_A``) at ``lr``; empty groups dropped.

    PEFT's function builds the optimizer from the groups; it is handed a builder that only keeps them, so any
    optimizer of `build_optimizer` can take them.
    """
    from peft.optimizers import create_loraplus_optimizer

    kept: list[list[dict[str, Any]]] = []

    def keep(groups: list[dict[str, Any]], **_kwargs: Any) -> Any:
        kept.append([g for g in groups if g["params"]])
        return None

    create_loraplus_optimizer(model, keep, lr=lr, loraplus_lr_ratio=float(ratio),  # type: ignore[arg-type]
                              loraplus_weight_decay=weight_decay)
    return kept[0]


def build_scheduler(name: str, optimizer: Any, warmup: int, total: int) -> Any:
    """transformers' cosine / linear / constant-with-warmup schedule."""
    from transformers import get_scheduler

    kind = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[name]
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
