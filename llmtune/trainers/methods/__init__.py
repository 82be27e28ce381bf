"""Methods: which parameters train. One small module per method; the table below names them (data, lazy).

A method is a `Method` subclass (see `llmtune.trainers.methods.base`): ``apply(model, options)`` makes the
right parameters trainable (wrapping the model if it needs to), ``save``/``load_weights`` write and read
what it trains. Adding one is a module plus a line here (or `register_method` from a plugin).

Besides PEFT's LoRA / DoRA (with rsLoRA scaling, PiSSA / OLoRA / LoftQ initialisation: `peft_methods`),
IA3, prompt and prefix tuning, there are llmtune's own bottleneck adapters (LLM-Adapters, arXiv 2304.01933:
series or parallel, after attention and/or MLP; `bottleneck`). Importing this package imports neither torch
nor PEFT.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmtune.core.errors import UnknownBackendError, did_you_mean

if TYPE_CHECKING:
    from llmtune.trainers.methods.base import Method

#: name -> "module:Class" (imported when first used).
METHODS: dict[str, str] = {
    "lora": "llmtune.trainers.methods.lora:LoRA",
    "dora": "llmtune.trainers.methods.lora:DoRA",
    "prompt_tuning": "llmtune.trainers.methods.prompt_tuning:PromptTuning",
    "prefix_tuning": "llmtune.trainers.methods.prefix_tuning:PrefixTuning",
    "ia3": "llmtune.trainers.methods.ia3:IA3",
    "bottleneck": "llmtune.trainers.methods.bottleneck:Bottleneck",
    "full": "llmtune.trainers.methods.full:Full",
}


def register_method(name: str, target: str) -> None:
    """Make method ``name`` available (``target`` = ``"module:Class"`` of a `Method` subclass)."""
    METHODS[name] = target


def get_method(name: str) -> Method:
    """An instance of method ``name``."""
    if name not in METHODS:
        raise UnknownBackendError(f"unknown method {name!r}.{did_you_mean(name, METHODS)} Known: {', '.join(METHODS)}")
    module, _, attr = METHODS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    method: Method = cls()
    return method


__all__ = ["METHODS", "get_method", "register_method"]
