"""A short optimisation loop shared by the reward, DPO and online objectives (until they plug into the recipe)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from llmtune.core.errors import InvalidOptionError, LlmtuneError

T = TypeVar("T")
LogFn = Callable[[dict[str, Any]], None]


class NonFiniteLossError(LlmtuneError, RuntimeError):
    """A training step produced a NaN or infinite loss."""


def seeded_batches(items: Sequence[T], batch_size: int, seed: int) -> Iterator[list[T]]:
    """Endless batches of ``items`` in a fresh seeded permutation each epoch (last short batch dropped if >1)."""
    if not items:
        raise InvalidOptionError("no training items")
    size = min(batch_size, len(items))
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        for start in range(0, len(order) - size + 1, size):
            yield [items[i] for i in order[start:start + size]]
        epoch += 1


class Logger:
    """Writes one JSON line per row to ``log_path`` (if any) and hands each row to ``callback`` (if any)."""

    def __init__(self, log_path: str | Path | None = None, callback: LogFn | None = None) -> None:
        self.path = Path(log_path) if log_path is not None else None
        self.callback = callback
        self.rows: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def __call__(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if self.callback is not None:
            self.callback(row)


def optimizer_for(model: torch.nn.Module, lr: float, steps: int, warmup: float = 0.05,
                  weight_decay: float = 0.0) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainable parameters, linear warmup then cosine decay to 10% over ``steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidOptionError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, where: str,
         max_grad_norm: float = 1.0) -> float:
    """Backward, clip, optimizer and scheduler step; returns the gradient norm."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"{where}: the loss is {loss.item()} (not finite); lower lr or beta")
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
