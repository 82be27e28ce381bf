"""Prefix tuning through PEFT (``PrefixTuningConfig``): ``num_virtual_tokens`` trained keys/values per layer."""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.trainers.methods.base import PeftMethod


class PrefixTuning(PeftMethod):
    """Only the per-layer prefixes train; the base model is untouched. Not with packing (shared prefixes)."""

    name: ClassVar[str] = "prefix_tuning"
    packing: ClassVar[bool] = False

    def peft_config(self, options: Any) -> Any:
        from llmtune.trainers.methods.peft_methods import PrefixTuningOptions

        return PrefixTuningOptions(num_virtual_tokens=options.num_virtual_tokens).peft_config()
