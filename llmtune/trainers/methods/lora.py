"""LoRA and DoRA through PEFT (``LoraConfig``; DoRA = ``use_dora=True``)."""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.trainers.methods.base import PeftMethod


class LoRA(PeftMethod):
    """Low-rank adapters on ``targets`` (rank, alpha, dropout)."""

    name: ClassVar[str] = "lora"
    dora: ClassVar[bool] = False

    def peft_config(self, options: Any) -> Any:
        from peft import LoraConfig, TaskType

        targets = options.targets if isinstance(options.targets, str) else list(options.targets)
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=options.rank,
                          lora_alpha=options.alpha,  # PEFT takes floats too
                          lora_dropout=options.dropout, target_modules=targets, use_dora=self.dora)


class DoRA(LoRA):
    """Weight-decomposed LoRA (magnitude + direction)."""

    name: ClassVar[str] = "dora"
    dora: ClassVar[bool] = True
