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
        # a reward model (objective "reward") is a sequence classifier: SEQ_CLS also trains its score head
        task = TaskType.SEQ_CLS if getattr(options, "peft_task_type", "") == "SEQ_CLS" else TaskType.CAUSAL_LM
        return LoraConfig(task_type=task, r=options.rank,
                          lora_alpha=options.alpha,  # PEFT takes floats too
                          lora_dropout=options.dropout, target_modules=targets, use_dora=self.dora)


class DoRA(LoRA):
    """Weight-decomposed LoRA (magnitude + direction)."""

    name: ClassVar[str] = "dora"
    dora: ClassVar[bool] = True
