"""Trainers: LoRA/QLoRA through PEFT on Accelerate, and through Unsloth.

This module only *declares* the built-in backends; each is imported when first used.
"""

from llmtune.core.registry import declare

declare("trainer", "lora", "peft", "llmtune.trainers.peft:PeftLoraTrainer",
        requires=("torch", "transformers", "peft", "accelerate"), extra="peft", default=True)
declare("trainer", "lora", "unsloth", "llmtune.trainers.unsloth:UnslothLoraTrainer",
        requires=("torch", "transformers", "peft", "unsloth"), extra="unsloth")
