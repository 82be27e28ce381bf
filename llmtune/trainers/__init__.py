"""Trainers: one recipe over three axes — objective (the trainer *name*), method (``method=``), backend.

Names: ``sft`` (supervised fine-tuning), ``pretrain`` (next-token on raw text), and ``lora`` (= ``sft``, kept
for existing callers). Backends: ``peft`` (transformers + PEFT on Accelerate) and ``unsloth``. Methods:
``lora``, ``dora``, ``ia3``, ``prompt_tuning``, ``prefix_tuning``, ``bottleneck``, ``full`` (see
`llmtune.trainers.methods`), on a quantized base with
``quantizer=``. This module only *declares* the built-ins (data); each is imported when first used.
"""

from llmtune.core.registry import declare

_PEFT = ("torch", "transformers", "peft", "accelerate")
_UNSLOTH = ("torch", "transformers", "peft", "unsloth")

#: (name, backend, "module:Class", requires, extra, default)
BUILTIN_TRAINERS = (
    ("sft", "peft", "llmtune.trainers.peft:PeftSftTrainer", _PEFT, "peft", True),
    ("sft", "unsloth", "llmtune.trainers.unsloth:UnslothSftTrainer", _UNSLOTH, "unsloth", False),
    ("pretrain", "peft", "llmtune.trainers.peft:PeftPretrainTrainer", _PEFT, "peft", True),
    ("dpo", "peft", "llmtune.trainers.peft:PeftDpoTrainer", _PEFT, "peft", True),
    ("reward", "peft", "llmtune.trainers.peft:PeftRewardTrainer", _PEFT, "peft", True),
    ("rloo", "peft", "llmtune.trainers.peft:PeftRlooTrainer", _PEFT, "peft", True),
    ("grpo", "peft", "llmtune.trainers.peft:PeftGrpoTrainer", _PEFT, "peft", True),
    ("lora", "peft", "llmtune.trainers.peft:PeftLoraTrainer", _PEFT, "peft", True),
    ("lora", "unsloth", "llmtune.trainers.unsloth:UnslothLoraTrainer", _UNSLOTH, "unsloth", False),
)

for _name, _backend, _target, _requires, _extra, _default in BUILTIN_TRAINERS:
    declare("trainer", _name, _backend, _target, requires=_requires, extra=_extra, default=_default)


def __getattr__(name: str) -> object:
    """The public helpers, imported on first use (this package stays light)."""
    import importlib

    where = {"trainer_class": "llmtune.trainers.base", "RecipeTrainer": "llmtune.trainers.base",
             "TrainerBackend": "llmtune.trainers.backend", "BackendContext": "llmtune.trainers.backend",
             "Callback": "llmtune.trainers.callbacks", "TrainOptions": "llmtune.trainers.options",
             "PretrainOptions": "llmtune.trainers.options", "support_matrix": "llmtune.trainers.matrix",
             "check_config": "llmtune.trainers.check", "ConfigCheck": "llmtune.trainers.check"}
    if name in where:
        return getattr(importlib.import_module(where[name]), name)
    raise AttributeError(f"module 'llmtune.trainers' has no attribute {name!r}")


__all__ = ["BUILTIN_TRAINERS", "BackendContext", "Callback", "ConfigCheck", "PretrainOptions", "RecipeTrainer", "TrainOptions",
           "TrainerBackend", "check_config", "support_matrix", "trainer_class"]
