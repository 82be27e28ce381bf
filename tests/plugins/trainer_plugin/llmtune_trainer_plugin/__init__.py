"""A trainer backend in one file: plain transformers, every weight trained, the model's own loss.

It implements `llmtune.trainers.TrainerBackend` (load, loss; `prepare`, `apply_method`, `save`,
`load_weights` keep their defaults) and makes one trainer per objective with `trainer_class`. The shared
loop (data order, accumulation, checkpoints, exact resume, guard, callbacks, log.jsonl) does the rest.
torch and transformers are imported inside the methods, so loading the entry point stays cheap.
"""

from __future__ import annotations

from typing import Any, ClassVar

from llmtune.core.errors import ConfigError
from llmtune.trainers.backend import BackendContext, TrainerBackend
from llmtune.trainers.base import trainer_class


class PlainBackend(TrainerBackend):
    """``transformers.AutoModelForCausalLM`` as it comes; full fine-tuning only."""

    name: ClassVar[str] = "plain"
    methods: ClassVar[tuple[str, ...]] = ("full",)
    objectives: ClassVar[tuple[str, ...]] = ("sft", "pretrain")
    requires: ClassVar[tuple[str, ...]] = ("torch", "transformers", "accelerate")
    extra: ClassVar[str | None] = None

    def load(self, model: Any, tokenizer: Any, ctx: BackendContext) -> tuple[Any, Any]:
        from torch import nn
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = AutoModelForCausalLM.from_pretrained(model)
        if not isinstance(model, nn.Module) or tokenizer is None:
            raise ConfigError("backend 'plain' takes a model directory, or an nn.Module with tokenizer=")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for p in model.parameters():
            p.requires_grad_(False)  # the method decides what trains
        return model.to(ctx.device), tokenizer

    def loss(self, model: Any, batch: Any, ctx: BackendContext) -> Any:
        """The model's own mean loss over the labelled tokens, times their count: the sum the loop wants."""
        labels = batch["labels"]
        count = (labels[:, 1:] != -100).sum().clamp(min=1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
        return out.loss.float() * count


PlainSft = trainer_class("sft", PlainBackend)
PlainPretrain = trainer_class("pretrain", PlainBackend)
