"""The trainer-backend protocol: how a model is loaded and run. A plugin implements it in one file.

The shared loop (`llmtune.trainers.loop`) calls, in this order::

    model, tokenizer = backend.load(model, tokenizer, ctx)      # path / hub id / nn.Module / config -> frozen model
    backend.prepare(model, ctx)                                 # gradient checkpointing, dtype choices
    model = backend.apply_method(model, ctx.method, ctx)        # which parameters train (LoRA, full, ...)
    loss_sum = backend.loss(model, batch, ctx)                  # SUM of next-token CE over labelled tokens
    with backend.generation(model): ...                         # greedy answers for held-out evaluation
    backend.save(model, tokenizer, path, ctx)                   # what the method trains, + the tokenizer
    backend.load_weights(model, path, ctx)                      # what `save` wrote, for exact resume
    backend.close()                                             # temporary files

``ctx`` is a `BackendContext`: the run's options, device, precision, method and objective name. Class
attributes say what the backend supports (the support matrix is built from them): ``methods``,
``objectives``, ``quantizers`` (quantizer names it accepts; ``None``: any trainable one), ``packing``
(whether its loss honours packed batches' ``position_ids``) and ``refused`` (method -> why not). Register it
with `llmtune.trainers.trainer_class` (one trainer class per objective). This module imports no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

    from llmtune.trainers.methods.base import Method


@dataclasses.dataclass
class BackendContext:
    """What a backend may read about the run it serves."""

    options: Any                 #: the trainer's options (a `TrainOptions`)
    device: Any                  #: the torch.device of this process
    precision: str               #: "bf16", "fp16" or "fp32" (resolved from options.precision)
    method: Method               #: the method unit (`llmtune.trainers.methods`)
    objective: str               #: "sft", "pretrain", ...
    seed: int = 0

    @property
    def base_dtype(self) -> Any:
        """The dtype to load the base in: bf16/fp16 when training in them (adapters), else None (fp32)."""
        import torch

        if self.method.master_fp32:
            return None
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


class TrainerBackend:
    """Base class of trainer backends; override what differs (the defaults are plain transformers + PEFT)."""

    name: ClassVar[str] = ""
    #: methods this backend can apply, objectives it can serve, quantizer names it accepts (None: any trainable)
    methods: ClassVar[tuple[str, ...]] = ("lora", "dora", "prompt_tuning", "full", "prefix_tuning", "ia3",
                                          "bottleneck")
    objectives: ClassVar[tuple[str, ...]] = ("sft", "pretrain")
    quantizers: ClassVar[tuple[str, ...] | None] = None
    #: whether its loss honours packed batches (``position_ids``: per-example attention, restarting positions);
    #: off by default, since a loss that ignores them lets packed examples attend to each other
    packing: ClassVar[bool] = False
    #: method -> why this backend cannot train it (shown by the support matrix and its errors)
    refused: ClassVar[dict[str, str]] = {}
    #: top-level modules it needs (checked without importing them) and the pip extra that installs them
    requires: ClassVar[tuple[str, ...]] = ("torch", "transformers", "peft", "accelerate")
    extra: ClassVar[str | None] = "peft"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run here, or None. Cheap: no heavy imports."""
        return None

    @classmethod
    def options_class(cls, objective_options: type) -> type:
        """The options dataclass of this backend for an objective (default: the objective's own)."""
        return objective_options

    def load(self, model: Any, tokenizer: Any, ctx: BackendContext) -> tuple[Any, Any]:
        """The base model (every parameter frozen) and its tokenizer, on ``ctx.device``."""
        raise NotImplementedError

    def prepare(self, model: Any, ctx: BackendContext) -> None:
        """Before the method is applied: gradient checkpointing and the like."""

    def apply_method(self, model: Any, method: Method, ctx: BackendContext) -> Any:
        """The model to train: ``method.apply`` by default."""
        return method.apply(model, ctx.options)

    def loss(self, model: Any, batch: Mapping[str, torch.Tensor], ctx: BackendContext) -> torch.Tensor:
        """SUM (not mean) of next-token cross-entropies over the labelled tokens of ``batch``."""
        raise NotImplementedError

    @contextlib.contextmanager
    def generation(self, model: Any) -> Iterator[Any]:
        """Around held-out generation; yields the module to call ``generate`` on."""
        yield model

    def save(self, model: Any, tokenizer: Any, path: Path, ctx: BackendContext) -> None:
        """Write what the method trains (and the tokenizer) into the directory ``path``."""
        ctx.method.save(model, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    def load_weights(self, model: Any, path: Path, ctx: BackendContext) -> None:
        """Load what `save` wrote back into ``model`` (resume)."""
        ctx.method.load_weights(model, path)

    def close(self) -> None:
        """Release what `load` created (temporary directories); called once the run ends."""
