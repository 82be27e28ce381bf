"""Backend ``peft``: the model loaded by transformers (quantized at load time through a `Quantizer`), methods
applied by PEFT (LoRA with rsLoRA / PiSSA / OLoRA / LoftQ / LoRA+, DoRA, IA3, prompt and prefix tuning) or by
llmtune (full, bottleneck adapters), and llmtune's chunked cross-entropy (packed batches: per-example attention).

This is the reference implementation of `llmtune.trainers.backend.TrainerBackend`: the loop, options, data,
evaluation and checkpoints are the recipe's (`llmtune.trainers.loop`), not this module's.

* QLoRA does not upcast embeddings / norms to fp32 (PEFT's ``prepare_model_for_kbit_training`` does) unless
  ``upcast_embeddings=True``;
* the loss is computed with chunked cross-entropy (no full ``[tokens, vocab]`` fp32 logits).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from llmtune.core.errors import ConfigError
from llmtune.trainers.backend import BackendContext, TrainerBackend
from llmtune.trainers.base import RecipeTrainer
from llmtune.trainers.objectives.dpo import ADD_SCORE_HEAD_HINT, DpoTrainOptions, RewardTrainOptions
from llmtune.trainers.objectives.online import OnlineTrainOptions
from llmtune.trainers.options import PretrainOptions, TrainOptions


def _device_map(device: Any) -> dict[str, Any]:
    return {"": device.index if device.type == "cuda" else str(device)}


def from_config(config: Any, dtype: Any, seed: int, head: str = "lm") -> Any:
    """A randomly initialised causal LM (from a config object, a dict, or a directory with only config.json);
    ``head="score"``: the same backbone as a 1-label sequence classifier (a reward model)."""
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

    if isinstance(config, dict):
        config = dict(config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
    elif not isinstance(config, PretrainedConfig):
        config = AutoConfig.from_pretrained(str(config))
    auto: Any = AutoModelForCausalLM
    if head == "score":
        config, auto = copy.deepcopy(config), AutoModelForSequenceClassification
        config.num_labels, config.architectures = 1, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto.from_config(config, dtype=dtype or torch.float32)


def _is_config_only(model: Any) -> bool:
    if isinstance(model, dict):
        return True
    if isinstance(model, (str, os.PathLike)) and os.path.isdir(model):
        names = set(os.listdir(model))
        return "config.json" in names and not any(n.endswith((".safetensors", ".bin")) for n in names)
    return type(model).__name__.endswith("Config") and hasattr(model, "to_dict")


class PeftBackend(TrainerBackend):
    """transformers + PEFT, run by llmtune's loop on Accelerate."""

    name: ClassVar[str] = "peft"
    objectives: ClassVar[tuple[str, ...]] = ("sft", "pretrain", "dpo", "reward", "rloo", "grpo")
    packing: ClassVar[bool] = True   # `model_loss` gives packed batches per-example attention (block-diagonal)

    def _load_module(self, model: Any, tokenizer: Any, ctx: BackendContext) -> tuple[Any, Any]:
        from torch import nn

        from llmtune.models.loading import gguf_path, load_tokenizer

        q, dtype = ctx.options.quantizer, ctx.base_dtype
        head = getattr(ctx.options, "model_head", "lm")
        if _is_config_only(model):
            if tokenizer is None and isinstance(model, (str, os.PathLike)):
                tokenizer = load_tokenizer(str(model))
            model = from_config(model, dtype, ctx.seed, head)
        elif q is not None and (gguf := gguf_path(model)) is not None:
            from llmtune.models.loading import load_gguf

            model, loaded_tok = load_gguf(gguf, dtype=dtype)  # GGUF: dense first, quantized below
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        elif isinstance(model, (str, os.PathLike)):
            from llmtune.models.loading import load_model_and_tokenizer

            qconfig = q.hf_quantization_config() if q is not None else None
            if q is not None and qconfig is None:
                raise ConfigError(f"{q.describe()} cannot quantize at load time (no hf_quantization_config); "
                                  "load the model yourself, quantize it, and pass the module")
            loaded, loaded_tok = load_model_and_tokenizer(
                str(model), dtype=dtype, quantization_config=qconfig, trust_remote_code=ctx.options.trust_remote_code,
                device_map=_device_map(ctx.device) if q is not None else None, head=head,
                fresh_head=bool(getattr(ctx.options, "add_score_head", False)), head_hint=ADD_SCORE_HEAD_HINT)
            return loaded, tokenizer if tokenizer is not None else loaded_tok
        elif not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a local path, a hub id, a config or a torch.nn.Module, "
                              f"not {type(model).__name__}")
        elif tokenizer is None:
            raise ConfigError("model is an nn.Module: pass tokenizer= as well (or give a model path)")
        elif head == "score":
            from llmtune.trainers.rlhf.reward import as_reward_model

            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
            model = as_reward_model(model, tokenizer, fresh_head=ctx.options.add_score_head, seed=ctx.seed,
                                    hint=ADD_SCORE_HEAD_HINT)
        if dtype is not None:
            model = model.to(dtype)
        if q is not None:  # quantize on the training device (faster on a GPU, and no 4-bit move after)
            model = q.quantize(model.to(ctx.device))
        return model, tokenizer

    def load(self, model: Any, tokenizer: Any, ctx: BackendContext) -> tuple[Any, Any]:
        """Load (path, hub id, config) or take (``nn.Module``) the base model, quantize it for QLoRA, freeze it."""
        import torch

        model, tokenizer = self._load_module(model, tokenizer, ctx)
        if tokenizer is None:
            raise ConfigError("no tokenizer: pass tokenizer= (the model directory has none)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(ctx.options, "model_head", "lm") == "score" and model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # the score head reads the last non-pad token
        for p in model.parameters():
            p.requires_grad_(False)
        if ctx.options.quantizer is not None and ctx.options.upcast_embeddings:
            for p in model.parameters():
                if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                    p.data = p.data.float()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        if ctx.options.quantizer is None and not getattr(model, "hf_device_map", None):
            model = model.to(ctx.device)
        return model, tokenizer

    def prepare(self, model: Any, ctx: BackendContext) -> None:
        """Non-reentrant activation checkpointing (no input-grad hack needed, frozen embeddings stay frozen)."""
        if not ctx.options.gradient_checkpointing:
            return
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def loss(self, model: Any, batch: Mapping[str, Any], ctx: BackendContext) -> Any:
        """SUM (not mean) of next-token cross-entropies over the labelled tokens of ``batch`` (chunked)."""
        from llmtune.trainers._loss import model_loss

        loss_sum, _count = model_loss(model, dict(batch), chunk_tokens=ctx.options.loss_chunk_tokens)
        return loss_sum


#: Kept for existing callers: the options of the ``lora``/``sft`` trainers.
PeftLoraOptions = TrainOptions


class PeftSftTrainer(RecipeTrainer):
    """``sft`` on the ``peft`` backend: LoRA (+ variants) / DoRA / IA3 / prompt and prefix tuning / bottleneck
    adapters / QLoRA / full fine-tuning."""

    name: ClassVar[str] = "sft"
    backend: ClassVar[str] = "peft"
    objective: ClassVar[str] = "sft"
    engine: ClassVar[type[TrainerBackend]] = PeftBackend
    Options: ClassVar[type] = TrainOptions


class PeftLoraTrainer(PeftSftTrainer):
    """``lora`` (= ``sft`` with ``method="lora"`` by default), kept for existing callers."""

    name: ClassVar[str] = "lora"


class PeftPretrainTrainer(RecipeTrainer):
    """``pretrain`` on the ``peft`` backend: next-token training on raw text, full or LoRA."""

    name: ClassVar[str] = "pretrain"
    backend: ClassVar[str] = "peft"
    objective: ClassVar[str] = "pretrain"
    engine: ClassVar[type[TrainerBackend]] = PeftBackend
    Options: ClassVar[type] = PretrainOptions


class PeftDpoTrainer(RecipeTrainer):
    """``dpo`` on the ``peft`` backend: DPO / IPO / SimPO / ORPO, reference = the adapter switched off."""

    name: ClassVar[str] = "dpo"
    backend: ClassVar[str] = "peft"
    objective: ClassVar[str] = "dpo"
    engine: ClassVar[type[TrainerBackend]] = PeftBackend
    Options: ClassVar[type] = DpoTrainOptions


class PeftRewardTrainer(RecipeTrainer):
    """``reward`` on the ``peft`` backend: Bradley-Terry on a 1-label sequence-classification model (full, or LoRA + score head)."""

    name: ClassVar[str] = "reward"
    backend: ClassVar[str] = "peft"
    objective: ClassVar[str] = "reward"
    engine: ClassVar[type[TrainerBackend]] = PeftBackend
    Options: ClassVar[type] = RewardTrainOptions


class PeftRlooTrainer(RecipeTrainer):
    """``rloo`` on the ``peft`` backend: K sampled answers per prompt scored by a saved reward model,
    leave-one-out advantages, KL to the reference = the adapter switched off."""

    name: ClassVar[str] = "rloo"
    backend: ClassVar[str] = "peft"
    objective: ClassVar[str] = "rloo"
    engine: ClassVar[type[TrainerBackend]] = PeftBackend
    Options: ClassVar[type] = OnlineTrainOptions


class PeftGrpoTrainer(PeftRlooTrainer):
    """``grpo`` on the ``peft`` backend: as ``rloo`` with group-normalised advantages."""

    name: ClassVar[str] = "grpo"
    objective: ClassVar[str] = "grpo"
