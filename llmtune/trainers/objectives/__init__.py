"""Objectives: what is optimised. An objective = how batches are built + its loss; one module each.

The table says which module implements each (imported when used) and which methods make sense for it.
A new objective (``reward``, ``dpo``, online RL) is a module with an `Objective` subclass plus a line here
(or `register_objective`), then a trainer class per backend (`llmtune.trainers.trainer_class`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmtune.core.errors import UnknownBackendError, did_you_mean

if TYPE_CHECKING:
    from llmtune.trainers.objectives.base import Objective

#: name -> ("module:Class", methods it allows, or None for every method)
OBJECTIVES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "sft": ("llmtune.trainers.objectives.sft:Sft", None),
    "pretrain": ("llmtune.trainers.objectives.pretrain:Pretrain", ("full", "lora", "dora")),
    "dpo": ("llmtune.trainers.objectives.dpo:Dpo", ("full", "lora", "dora")),
    "reward": ("llmtune.trainers.objectives.dpo:Reward", ("full", "lora", "dora")),
    "rloo": ("llmtune.trainers.objectives.online:Rloo", ("lora", "dora")),
    "grpo": ("llmtune.trainers.objectives.online:Grpo", ("lora", "dora")),
}


def register_objective(name: str, target: str, methods: tuple[str, ...] | None = None) -> None:
    """Make objective ``name`` available (``target`` = ``"module:Class"`` of an `Objective` subclass)."""
    OBJECTIVES[name] = (target, methods)


def objective_packs(name: str) -> bool:
    """Whether objective ``name`` trains on packed rows when asked (``packing=True``)."""
    return name in OBJECTIVES and type(get_objective(name)).packs


def get_objective(name: str) -> Objective:
    """An instance of objective ``name``."""
    if name not in OBJECTIVES:
        raise UnknownBackendError(f"unknown objective {name!r}.{did_you_mean(name, OBJECTIVES)} "
                                  f"Known: {', '.join(OBJECTIVES)}")
    module, _, attr = OBJECTIVES[name][0].partition(":")
    objective: Objective = getattr(importlib.import_module(module), attr)()
    return objective


__all__ = ["OBJECTIVES", "get_objective", "objective_packs", "register_objective"]
