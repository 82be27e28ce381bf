"""(IA)^3 through PEFT (``IA3Config``): learned rescaling vectors of keys, values and the MLP input."""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.trainers.methods.base import PeftMethod


def ia3_options(options: Any) -> Any:
    """The typed IA3 options: PEFT's Llama targets for ``targets="all-linear"``, else the named modules."""
    from llmtune.trainers.methods import peft_methods as pm

    if options.targets == "all-linear":
        return pm.IA3Options()
    targets = (options.targets,) if isinstance(options.targets, str) else tuple(options.targets)
    return pm.IA3Options(targets=targets, feedforward=tuple(t for t in pm.IA3_FEEDFORWARD if t in targets))


class IA3(PeftMethod):
    """One trained vector per target module (``k_proj``, ``v_proj``, ``down_proj`` by default)."""

    name: ClassVar[str] = "ia3"

    def peft_config(self, options: Any) -> Any:
        return ia3_options(options).peft_config()
