"""Soft prompts (prompt tuning) through PEFT: ``num_virtual_tokens`` trained embeddings before the input."""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.trainers.methods.base import PeftMethod


class PromptTuning(PeftMethod):
    """Only the virtual-token embeddings train; the base model is untouched."""

    name: ClassVar[str] = "prompt_tuning"
    packing: ClassVar[bool] = False

    def peft_config(self, options: Any) -> Any:
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=options.num_virtual_tokens)
