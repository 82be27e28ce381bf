"""GPU-memory model for LLM serving and fine-tuning; stdlib only (never imports torch).

``estimate_training``/``estimate_serving`` predict ``torch.cuda.max_memory_allocated()`` term by term;
see docs/memory.md for the derivation of every term.
"""

from __future__ import annotations

from llmtune.memory.estimate import (
    ATTENTIONS,
    METHODS,
    OPTIMIZERS,
    RECIPES,
    SHARDINGS,
    Estimate,
    estimate_serving,
    estimate_training,
    estimate_weights,
    lora_params,
    max_batch_size,
    max_seq_len,
    resolve_lora_targets,
    rule_of_thumb_serving_gb,
)
from llmtune.memory.gpus import GPUS, gpu_bytes
from llmtune.memory.presets import PRESETS
from llmtune.memory.spec import FAMILIES, ModelSpec

__all__ = [
    "ATTENTIONS", "FAMILIES", "GPUS", "METHODS", "OPTIMIZERS", "PRESETS", "RECIPES", "SHARDINGS", "Estimate",
    "ModelSpec", "estimate_serving", "estimate_training", "estimate_weights", "gpu_bytes", "lora_params", "max_batch_size",
    "max_seq_len", "resolve_lora_targets", "rule_of_thumb_serving_gb",
]
