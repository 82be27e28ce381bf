"""LoRA and DoRA through PEFT (``LoraConfig``; DoRA = ``use_dora=True``), with rsLoRA scaling and the PiSSA /
OLoRA / LoftQ initialisations (`llmtune.trainers.methods.peft_methods.LoraVariantOptions`)."""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.trainers.methods.base import PeftMethod


def lora_variant(options: Any, *, dora: bool) -> Any:
    """The typed LoRA options (`LoraVariantOptions`) of a trainer's options."""
    from llmtune.trainers.methods.peft_methods import LoraVariantOptions

    return LoraVariantOptions(rank=options.rank, alpha=options.alpha, dropout=options.dropout,
                              targets=options.targets, rslora=getattr(options, "rslora", False),
                              init=getattr(options, "init", "default"), dora=dora)


class LoRA(PeftMethod):
    """Low-rank adapters on ``targets`` (rank, alpha, dropout; ``rslora``, ``init``)."""

    name: ClassVar[str] = "lora"
    dora: ClassVar[bool] = False

    def peft_config(self, options: Any) -> Any:
        config = lora_variant(options, dora=self.dora).peft_config()
        if getattr(options, "peft_task_type", "") == "SEQ_CLS":  # a reward model: SEQ_CLS also trains its score head
            from peft import TaskType

            config.task_type = TaskType.SEQ_CLS
        return config


class DoRA(LoRA):
    """Weight-decomposed LoRA (magnitude + direction)."""

    name: ClassVar[str] = "dora"
    dora: ClassVar[bool] = True
