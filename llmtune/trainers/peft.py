"""Trainer ``lora`` (backend ``peft``): LoRA (rsLoRA, PiSSA, OLoRA, LoftQ, LoRA+), DoRA, IA3, prompt and prefix
tuning, and QLoRA through PEFT, plus our bottleneck adapters (`llmtune.trainers.methods`), on HF Accelerate.

The loop is llmtune's own (not ``transformers.Trainer``) so that it can promise what it does:

* the same code runs on one CPU, one GPU, or many under ``accelerate launch`` (DDP; FSDP/DeepSpeed through
  accelerate's config) — data order is computed from the seed, so every process knows the global batch;
* the loss is the exact token-mean over the whole global batch (all micro-batches, all processes), computed
  with chunked cross-entropy (no full ``[tokens, vocab]`` fp32 logits);
* QLoRA does not upcast embeddings / norms to fp32 (PEFT's ``prepare_model_for_kbit_training`` does) unless
  ``upcast_embeddings=True``;
* checkpoints are atomic and hold everything needed for exact resume (adapter, optimizer, scheduler, RNG,
  step; the data order is a function of seed and step); a non-finite loss stops the run without touching the
  last good checkpoint; Ctrl-C saves a checkpoint, then stops;
* ``OUTPUT/log.jsonl`` gets one line per optimizer step (and per evaluation).

Subclasses (the Unsloth backend) override `_load`, `_apply_adapter`, `_enable_gradient_checkpointing` and
`_loss`; everything else is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import signal
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llmtune.core.errors import ConfigError, DamagedFileError, InvalidOptionError, LlmtuneError, OutputDirError
from llmtune.core.interfaces import Quantizer, Trainer
from llmtune.core.options import check_choice, check_type
from llmtune.core.results import TrainResult
from llmtune.trainers import _checkpoint as ckpt
from llmtune.trainers._evaluate import generate, score
from llmtune.trainers._loss import model_loss

_TEMPLATES = ("llama3", "llama3.1", "chatml", "alpaca", "tokenizer")
_METHODS = ("lora", "dora", "prompt_tuning", "prefix_tuning", "ia3", "bottleneck")
_SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning")
_ADAPTER = "adapter"
#: Options that do not change what is trained: changing them keeps the run (and its output_dir) the same.
_NOT_RUN_IDENTITY = frozenset({"eval_every", "eval_examples", "eval_batch_size", "max_new_tokens", "save_every",
                               "keep_checkpoints", "output_dir", "log_every", "progress", "gradient_checkpointing",
                               "loss_chunk_tokens"})


def _positive(field: str, value: object, kind: type | tuple[type, ...] = int, *, zero_ok: bool = False) -> None:
    check_type(field, value, kind)
    assert isinstance(value, (int, float))
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise InvalidOptionError(f"option {field}={value!r} must be a finite number {'>= 0' if zero_ok else '> 0'}")


@dataclasses.dataclass(frozen=True)
class PeftLoraOptions:
    """Options of the ``lora`` trainer; every one can also be passed to `PeftLoraTrainer.train` to override."""

    # adapter
    method: str = "lora"                     #: "lora", "dora", "prompt_tuning", "prefix_tuning", "ia3", "bottleneck"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | tuple[str, ...] = "all-linear"   #: module names, or "all-linear" (every linear but lm_head)
    num_virtual_tokens: int = 20             #: soft-prompt / prefix length for "prompt_tuning" / "prefix_tuning"
    rslora: bool = False                     #: LoRA/DoRA: scaling alpha/sqrt(rank) instead of alpha/rank
    init: str = "default"                    #: LoRA init: "default", "gaussian", "pissa", "olora", "loftq" (GPU)
    loraplus_ratio: float | None = None      #: LoRA+: the B matrices' learning rate is lr * loraplus_ratio
    bottleneck_size: int = 64                #: method="bottleneck": bottleneck width b
    bottleneck_placement: str = "series"     #: "series" (reads the sub-layer output) or "parallel" (its input)
    bottleneck_sites: str | tuple[str, ...] = ("mlp",)   #: after "attn" and/or "mlp"
    bottleneck_non_linearity: str = "tanh"   #: "tanh", "relu", "gelu" or "silu"
    bottleneck_scaling: float = 1.0
    quantizer: Quantizer | None = None       #: a trainable quantizer (e.g. get_quantizer("nf4")) -> QLoRA
    upcast_embeddings: bool = False          #: cast non-quantized 16-bit params to fp32 (PEFT's kbit recipe)
    gradient_checkpointing: bool = False
    precision: str = "auto"                  #: "auto" (bf16 on a GPU that has it, else fp32), "bf16", "fp16", "fp32"
    trust_remote_code: bool = False
    # optimisation
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None             #: overrides epochs when set
    batch_size: int = 4                      #: per process, per micro-batch
    grad_accum: int = 1
    warmup: float = 0.03                     #: a fraction of the steps if < 1, else a number of steps
    scheduler: str = "cosine"                #: "cosine", "linear" or "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0               #: 0 disables clipping
    loss_chunk_tokens: int = 1024            #: rows of logits per chunk in the loss; 0 = all at once
    # data
    template: str = "llama3"                 #: "llama3", "llama3.1", "chatml", "alpaca" or "tokenizer" (its own)
    max_length: int = 512
    packing: bool = False
    train_on_prompt: bool = False
    train_on: str = "assistant"              #: "assistant" (every answer), "last_turn" or "everything"
    system_prompt: str | None = None         #: the system turn of records that have none
    # evaluation, checkpoints, logs
    eval_every: int = 0                      #: also evaluate every N steps (0: only before and after)
    eval_examples: int = 64                  #: held-out examples generated per evaluation (0 = all)
    eval_batch_size: int = 8
    max_new_tokens: int = 64
    save_every: int = 0                      #: checkpoint every N steps (0: only on Ctrl-C)
    keep_checkpoints: int = 2                #: newest checkpoints kept (0 = all)
    seed: int = 0
    output_dir: str = "llmtune-output"
    log_every: int = 1                       #: progress-bar refresh period in steps (log.jsonl gets every step)
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, _METHODS)
        _positive("rank", self.rank)
        _positive("alpha", self.alpha, (int, float))
        check_type("dropout", self.dropout, (int, float))
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"option dropout={self.dropout!r} must be in [0, 1)")
        targets = self.targets
        if isinstance(targets, list):
            targets = tuple(targets)
            object.__setattr__(self, "targets", targets)
        if isinstance(targets, str):
            if not targets:
                raise InvalidOptionError("option targets='' is empty; use 'all-linear' or a list of module names")
        elif not (isinstance(targets, tuple) and targets and all(isinstance(t, str) and t for t in targets)):
            raise InvalidOptionError(f"option targets={targets!r} must be 'all-linear' or a non-empty list of "
                                     "module names such as ['q_proj', 'v_proj']")
        _positive("num_virtual_tokens", self.num_virtual_tokens)
        if self.quantizer is not None:
            if not isinstance(self.quantizer, Quantizer):
                raise InvalidOptionError(f"option quantizer={self.quantizer!r} must be a Quantizer, e.g. "
                                         "llmtune.get_quantizer('nf4')")
            if not type(self.quantizer).trainable:
                raise InvalidOptionError(f"option quantizer: {self.quantizer.describe()} cannot be trained on "
                                         "(trainable=False); use nf4, fp4 or int8")
        check_type("upcast_embeddings", self.upcast_embeddings, bool)
        check_type("gradient_checkpointing", self.gradient_checkpointing, bool)
        check_choice("precision", self.precision, ("auto", "bf16", "fp16", "fp32"))
        check_type("trust_remote_code", self.trust_remote_code, bool)
        _positive("lr", self.lr, (int, float))
        _positive("epochs", self.epochs)
        if self.max_steps is not None:
            _positive("max_steps", self.max_steps)
        _positive("batch_size", self.batch_size)
        _positive("grad_accum", self.grad_accum)
        _positive("warmup", self.warmup, (int, float), zero_ok=True)
        if self.warmup >= 1 and float(self.warmup) != int(self.warmup):
            raise InvalidOptionError(f"option warmup={self.warmup!r}: a fraction must be < 1, a step count whole")
        check_choice("scheduler", self.scheduler, ("cosine", "linear", "constant"))
        _positive("weight_decay", self.weight_decay, (int, float), zero_ok=True)
        _positive("max_grad_norm", self.max_grad_norm, (int, float), zero_ok=True)
        _positive("loss_chunk_tokens", self.loss_chunk_tokens, zero_ok=True)
        check_choice("template", self.template, _TEMPLATES)
        _positive("max_length", self.max_length)
        check_type("packing", self.packing, bool)
        check_type("train_on_prompt", self.train_on_prompt, bool)
        check_choice("train_on", self.train_on, ("assistant", "last_turn", "everything"))
        if self.system_prompt is not None:
            check_type("system_prompt", self.system_prompt, str)
        self._check_method()
        for name in ("eval_every", "eval_examples", "save_every", "keep_checkpoints", "seed"):
            _positive(name, getattr(self, name), zero_ok=True)
        for name in ("eval_batch_size", "max_new_tokens", "log_every"):
            _positive(name, getattr(self, name))
        check_type("output_dir", self.output_dir, (str, os.PathLike))
        check_type("progress", self.progress, bool)

    def _check_method(self) -> None:
        """Validate the method's own options (typed dataclasses in `llmtune.trainers.methods`) and combinations."""
        from llmtune.trainers.methods.peft_methods import check_quantized_base

        if isinstance(self.bottleneck_sites, (str, list)):
            sites = (self.bottleneck_sites,) if isinstance(self.bottleneck_sites, str) else tuple(self.bottleneck_sites)
            object.__setattr__(self, "bottleneck_sites", sites)
        lora = self.method in ("lora", "dora")
        for field, default in (("rslora", False), ("init", "default"), ("loraplus_ratio", None)):
            if getattr(self, field) != default and not lora:
                raise InvalidOptionError(f"option {field}={getattr(self, field)!r} applies to method 'lora' or 'dora', "
                                         f"not {self.method!r}")
        try:
            self.method_options()
        except InvalidOptionError as exc:  # name the trainer's option (bottleneck_size), not the dataclass field
            message = re.sub(r"option (size|placement|sites|non_linearity|scaling)\b", r"option bottleneck_\1", str(exc))
            raise InvalidOptionError(message) from None
        if self.loraplus_ratio is not None:
            _positive("loraplus_ratio", self.loraplus_ratio, (int, float))
            if self.loraplus_ratio < 1:
                raise InvalidOptionError(f"option loraplus_ratio={self.loraplus_ratio!r} must be >= 1")
        if self.quantizer is not None:
            if self.init == "loftq":
                raise InvalidOptionError("option init='loftq' replaces the base weights by their quantized "
                                         f"approximation itself; leave quantizer unset (got {self.quantizer.describe()})")
            try:
                check_quantized_base(self.init, quantized=True)
            except ConfigError as exc:
                raise InvalidOptionError(f"option init={self.init!r}: {exc}") from None
        if self.packing and self.method in _SOFT_PROMPTS:
            raise InvalidOptionError(f"option packing=True with method={self.method!r}: the virtual tokens would be "
                                     "shared by every packed example; use packing=False")

    def method_options(self) -> Any:
        """The typed options of the method (`LoraVariantOptions`, `IA3Options`, `PrefixTuningOptions`,
        `BottleneckOptions`), or None for prompt tuning."""
        from llmtune.trainers.methods import peft_methods as pm
        from llmtune.trainers.methods.bottleneck import BottleneckOptions

        if self.method in ("lora", "dora"):
            return pm.LoraVariantOptions(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                                         rslora=self.rslora, init=self.init, dora=self.method == "dora")
        if self.method == "ia3":
            if self.targets == "all-linear":
                return pm.IA3Options()
            targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
            return pm.IA3Options(targets=targets, feedforward=tuple(t for t in pm.IA3_FEEDFORWARD if t in targets))
        if self.method == "prefix_tuning":
            return pm.PrefixTuningOptions(num_virtual_tokens=self.num_virtual_tokens)
        if self.method == "bottleneck":
            sites = (self.bottleneck_sites,) if isinstance(self.bottleneck_sites, str) else self.bottleneck_sites
            return BottleneckOptions(size=self.bottleneck_size, placement=self.bottleneck_placement, sites=sites,
                                     non_linearity=self.bottleneck_non_linearity,
                                     scaling=self.bottleneck_scaling, dropout=self.dropout)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the quantizer becomes its description)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        q = out["quantizer"]
        out["quantizer"] = None if q is None else {"name": q.name, "backend": q.backend,
                                                   **_jsonable(dataclasses.asdict(q.options))}
        out["targets"] = out["targets"] if isinstance(out["targets"], str) else list(out["targets"])
        out["bottleneck_sites"] = list(out["bottleneck_sites"])
        out["output_dir"] = str(out["output_dir"])
        return out


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _accelerator(mixed_precision: str) -> Any:
    """An `Accelerator`; in one process, a second run may change the precision the first one chose."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # no GPU: say so, or accelerate ignores torch.distributed.run/`accelerate launch` processes on CPU (gloo)
    mps = getattr(torch.backends, "mps", None)
    cpu = not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as exc:
        if "already been initialized" not in str(exc) or AcceleratorState().num_processes > 1:
            raise
        # accelerate keeps one global state per process; reset it (not the process group) for the new run
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class _StopRequested(Exception):
    """Internal: raised at a step boundary when Ctrl-C was pressed."""


class _LossModule(nn.Module):
    """What Accelerate prepares (and DDP wraps): model + loss, so the loss runs inside the wrapped forward."""

    def __init__(self, model: nn.Module, trainer: PeftLoraTrainer) -> None:
        super().__init__()
        self.model = model
        self._trainer = [trainer]  # a list, so nn.Module does not try to register it

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if position_ids is not None:
            batch["position_ids"] = position_ids
        return self._trainer[0]._loss(self.model, batch)


def _label_count(labels: Sequence[int]) -> int:
    """Tokens a causal-LM loss scores in one example (labels shifted by one, -100 ignored)."""
    return sum(1 for t in labels[1:] if t != -100)


def _memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated tensors on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except ImportError:  # pragma: no cover - windows
        return 0


class PeftLoraTrainer(Trainer):
    """LoRA-family / IA3 / soft-prompt / bottleneck-adapter fine-tuning (QLoRA too), on HF Accelerate."""

    name: ClassVar[str] = "lora"
    backend: ClassVar[str] = "peft"
    Options: ClassVar[type] = PeftLoraOptions
    options: PeftLoraOptions

    # ------------------------------------------------------------------ hooks a backend subclass overrides
    def _load(self, model: Any, tokenizer: Any) -> tuple[nn.Module, Any]:
        """Load (path or hub id) or take (``nn.Module``) the base model, quantize it for QLoRA, freeze it."""
        opts = self.options
        dtype = self._base_dtype()
        q = opts.quantizer
        if isinstance(model, (str, os.PathLike)):
            from llmtune.models.loading import load_model_and_tokenizer

            qconfig = q.hf_quantization_config() if q is not None else None
            if q is not None and qconfig is None:
                raise ConfigError(f"{q.describe()} cannot quantize at load time (no hf_quantization_config); "
                                  "load the model yourself, quantize it, and pass the module")
            loaded, loaded_tok = load_model_and_tokenizer(
                str(model), dtype=dtype, quantization_config=qconfig, trust_remote_code=opts.trust_remote_code,
                device_map=self._device_map() if q is not None else None)
            model = loaded
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        elif isinstance(model, nn.Module):
            if tokenizer is None:
                raise ConfigError("model is an nn.Module: pass tokenizer= as well (or give a model path)")
            if dtype is not None:
                model = model.to(dtype)
            if q is not None:  # quantize on the training device (faster on a GPU, and no 4-bit move after)
                model = q.quantize(model.to(self._device))
        else:
            raise ConfigError(f"model must be a local path, a hub id or a torch.nn.Module, not {type(model).__name__}")
        if tokenizer is None:
            raise ConfigError("no tokenizer: pass tokenizer= (the model directory has none)")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for p in model.parameters():
            p.requires_grad_(False)
        if q is not None and opts.upcast_embeddings:
            for p in model.parameters():
                if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
                    p.data = p.data.float()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        if q is None and not getattr(model, "hf_device_map", None):
            model = model.to(self._device)
        return model, tokenizer

    def _enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Non-reentrant activation checkpointing (no input-grad hack needed, frozen embeddings stay frozen)."""
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 (the old name warns)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise ConfigError(f"{type(model).__name__} does not support gradient checkpointing")
        enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _apply_adapter(self, model: nn.Module) -> nn.Module:
        """Add the method's trainable parameters: a PEFT adapter, or our bottleneck adapters (in place)."""
        from peft import PromptTuningConfig, TaskType, get_peft_model

        opts = self.options
        method = opts.method_options()
        if opts.method == "bottleneck":
            from llmtune.trainers.methods.bottleneck import inject_bottleneck

            inject_bottleneck(model, method)
            return model
        config = (PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=opts.num_virtual_tokens)
                  if method is None else method.peft_config())
        try:
            with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                        category=FutureWarning)
                peft_model = get_peft_model(model, config)
        except ValueError as exc:
            raise ConfigError(f"could not apply {opts.method} to {type(model).__name__}: {exc}") from exc
        return peft_model

    def _optimizer(self, model: nn.Module, trainable: list[nn.Parameter]) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters; LoRA+ groups (B at lr * loraplus_ratio) when asked."""
        opts = self.options
        if opts.loraplus_ratio is not None:
            from llmtune.trainers.methods.peft_methods import loraplus_optimizer

            return loraplus_optimizer(model, lr=opts.lr, ratio=opts.loraplus_ratio,  # type: ignore[no-any-return]
                                      weight_decay=opts.weight_decay)
        return torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=opts.weight_decay)

    def _write_adapter(self, model: nn.Module, directory: Path) -> None:
        """The adapter's files: PEFT's format, or ``bottleneck_model.safetensors`` + ``bottleneck_config.json``."""
        if self.options.method == "bottleneck":
            from llmtune.trainers.methods.bottleneck import save_bottleneck

            save_bottleneck(model, directory)
        else:
            model.save_pretrained(str(directory), safe_serialization=True)  # type: ignore[operator]

    def _loss(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """SUM (not mean) of next-token cross-entropies over the labelled tokens of ``batch`` (chunked)."""
        loss_sum, _count = model_loss(model, dict(batch), chunk_tokens=self.options.loss_chunk_tokens)
        return loss_sum

    # ------------------------------------------------------------------ helpers
    def _base_dtype(self) -> torch.dtype | None:
        p = self._precision
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)

    def _device_map(self) -> dict[str, Any] | None:
        return {"": self._device.index if self._device.type == "cuda" else str(self._device)}

    def _resolve_precision(self) -> str:
        p = self.options.precision
        if p == "auto":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        if p == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision='fp16' needs a CUDA GPU (use 'bf16' or 'fp32' on CPU)")
        return p

    def _records(self, data: Any, what: str) -> list[dict[str, Any]]:
        from llmtune.data import load_records

        if isinstance(data, (str, os.PathLike)):
            return load_records(Path(data))
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            records = list(data)
            for i, r in enumerate(records):
                if not isinstance(r, Mapping):
                    raise ConfigError(f"{what}[{i}] is a {type(r).__name__}, not a record (dict)")
            return [dict(r) for r in records]
        raise ConfigError(f"{what} must be a path to .jsonl/.json/.csv or a list of records, not {type(data).__name__}")

    def _examples(self, records: list[dict[str, Any]], tokenizer: Any, source: str) -> list[Any]:
        from llmtune.data import build_examples, pack_examples

        opts = self.options
        examples = build_examples(records, tokenizer, template=opts.template, max_length=opts.max_length,
                                  train_on_prompt=opts.train_on_prompt, source=source, train_on=opts.train_on,
                                  system_prompt=opts.system_prompt)
        if opts.packing:
            examples = pack_examples(examples, opts.max_length)
        return list(examples)

    def _eval_set(self, records: list[dict[str, Any]], tokenizer: Any) -> tuple[list[list[int]], list[str]]:
        """(prompt token ids, reference answers) for the held-out records."""
        from llmtune.data import render_prompt

        n = self.options.eval_examples
        chosen = records if n == 0 else records[:n]
        prompts, refs = [], []
        for rec in chosen:
            prompt, answer = render_prompt(rec, self.options.template, tokenizer,
                                           system_prompt=self.options.system_prompt)
            prompts.append(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]))
            refs.append(answer.strip())
        return prompts, refs

    def _evaluate(self, model: nn.Module, tokenizer: Any, eval_set: tuple[list[list[int]], list[str]] | None,
                  tag: str, out: Path | None) -> dict[str, float]:
        """Generate greedy answers on every process's share, gather them, score them on every process."""
        if eval_set is None or not eval_set[0]:
            return {}
        acc = self._accelerator
        prompts, refs = eval_set
        world, rank = acc.num_processes, acc.process_index
        mine = list(range(rank, len(prompts), world))
        rng = ckpt.rng_state()
        answers = generate(model, tokenizer, [prompts[i] for i in mine],
                           max_new_tokens=self.options.max_new_tokens, batch_size=self.options.eval_batch_size)
        ckpt.set_rng_state(rng)
        if world > 1:
            from accelerate.utils import gather_object

            pairs = gather_object([list(zip(mine, answers))])
            by_index = {i: a for part in pairs for i, a in part}
        else:
            by_index = dict(zip(mine, answers))
        predictions = [by_index[i] for i in range(len(prompts))]
        result = score(predictions, refs)
        if out is not None and acc.is_main_process:
            with open(out / f"eval-{tag}.jsonl", "w") as fh:
                for p, r in zip(predictions, refs):
                    fh.write(json.dumps({"prediction": p, "reference": r}) + "\n")
        return result

    def _claim(self, out: Path, model: Any, records: list[dict[str, Any]], resume: bool | str | os.PathLike[str],
               overwrite: bool, allow_changes: tuple[str, ...]
               ) -> tuple[ckpt.Fingerprint, Path | None, list[ckpt.CheckpointEvent]]:
        """Claim ``out`` for this run (see `_checkpoint.claim_output_dir`) and find the checkpoint to resume."""
        acc = self._accelerator
        data = hashlib.sha256(json.dumps(records, sort_keys=True, default=str).encode()).hexdigest()[:16]
        config = {k: v for k, v in self.options.to_dict().items() if k not in _NOT_RUN_IDENTITY}
        run_fp = ckpt.Fingerprint(config={"trainer": f"{self.name}/{self.backend}", "model": self._model_id(model),
                                          **config}, data=data)
        events: list[ckpt.CheckpointEvent] = []
        if acc.is_main_process:
            events += ckpt.claim_output_dir(out, run_fp, overwrite=overwrite, resume=resume not in (False, None),
                                            allow_changes=allow_changes).events
        acc.wait_for_everyone()
        resume_from, skipped = ckpt.resolve_resume(resume, out)
        return run_fp, resume_from, events + skipped

    @staticmethod
    def _model_id(model: Any) -> str:
        """What names the base model in the run fingerprint: a local directory by its config and weight-file
        sizes (so a moved project still resumes, a changed model does not), a hub id as is, a module by size."""
        if isinstance(model, (str, os.PathLike)):
            local = Path(model).expanduser()
            if not (local / "config.json").is_file():
                return str(model)
            h = hashlib.sha256((local / "config.json").read_bytes())
            for f in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
            return f"local:{h.hexdigest()[:16]}"
        if isinstance(model, nn.Module):
            return f"{type(model).__name__}({sum(p.numel() for p in model.parameters())} parameters)"
        return type(model).__name__

    def _fingerprint(self, examples: list[Any]) -> str:
        h = hashlib.sha256()
        for ex in examples:
            h.update(json.dumps([list(ex.input_ids), list(ex.labels)]).encode())
        return h.hexdigest()[:16]

    def _on_step_end(self, step: int, record: dict[str, Any]) -> None:
        """Called after every optimizer step on every process (a subclass may observe or stop the run)."""

    # ------------------------------------------------------------------ the public call
    def train(self, model: Any, data: Any, *, eval_data: Any = None, tokenizer: Any = None,
              output_dir: str | os.PathLike[str] | None = None, resume: bool | str | os.PathLike[str] = False,
              overwrite: bool = False, allow_changes: Sequence[str] = (), **overrides: Any) -> TrainResult:
        """Fine-tune ``model`` (path, hub id or ``nn.Module``) on ``data`` (path or records); see the class doc.

        ``eval_data`` (path or records) is answered greedily and scored (ROUGE/BLEU) before and after
        training and every ``eval_every`` steps. ``resume``: False, "auto" (newest checkpoint in
        ``output_dir`` if any) or a checkpoint path. ``output_dir`` belongs to one run: another run's directory
        is refused unless ``overwrite=True``; a resume whose settings or data changed is refused unless each
        changed field is named in ``allow_changes`` (e.g. ``("max_steps",)``). Any option can be overridden here
        by keyword.
        """
        base_options = self.options
        if overrides:
            from llmtune.core.options import build_options

            merged = {f.name: getattr(base_options, f.name) for f in dataclasses.fields(base_options)}
            unknown = [k for k in overrides if k not in merged]
            if unknown:
                build_options(self.Options, {k: overrides[k] for k in unknown}, where=self.describe())
            merged.update(overrides)
            self.options = build_options(self.Options, merged, where=self.describe())
        try:
            return self._train(model, data, eval_data=eval_data, tokenizer=tokenizer,
                               output_dir=Path(output_dir if output_dir is not None else self.options.output_dir),
                               resume=resume, overwrite=overwrite, allow_changes=tuple(allow_changes))
        finally:
            self.options = base_options

    def _train(self, model: Any, data: Any, *, eval_data: Any, tokenizer: Any, output_dir: Path,
               resume: bool | str | os.PathLike[str], overwrite: bool = False,
               allow_changes: tuple[str, ...] = ()) -> TrainResult:
        from accelerate.utils import set_seed

        from llmtune.data import collate

        opts = self.options
        self._precision = self._resolve_precision()
        mixed = {"bf16": "bf16", "fp16": "fp16"}.get(self._precision, "no")
        acc = _accelerator(mixed)
        self._accelerator = acc
        self._device = acc.device
        world, rank = acc.num_processes, acc.process_index
        out = output_dir
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        set_seed(opts.seed)

        # ---- the output directory (before the model loads: a refused directory costs nothing), model and data
        train_records = self._records(data, "data")
        run_fp, resume_from, events = self._claim(out, model, train_records, resume, overwrite, allow_changes)
        base, tokenizer = self._load(model, tokenizer)
        examples = self._examples(train_records, tokenizer, "data")
        if not examples:
            raise ConfigError("data: no training examples")
        eval_set = None
        if eval_data is not None:
            eval_set = self._eval_set(self._records(eval_data, "eval_data"), tokenizer)
        n = len(examples)
        global_batch = opts.batch_size * opts.grad_accum * world
        steps_per_epoch = n // global_batch
        if steps_per_epoch == 0:
            raise ConfigError(f"data: {n} examples are fewer than one global batch (batch_size {opts.batch_size} x "
                              f"grad_accum {opts.grad_accum} x {world} processes = {global_batch}); lower them")
        total_steps = opts.max_steps if opts.max_steps is not None else opts.epochs * steps_per_epoch
        fingerprint = self._fingerprint(examples)

        state: dict[str, Any] = {}
        if resume_from is not None:
            state = ckpt.check_resumable(resume_from, run_fp, allow_changes)
            if state.get("fingerprint") != fingerprint and "data" not in allow_changes:
                raise OutputDirError(f"cannot resume from {resume_from}: the tokenized training data differ from "
                                     f"that run's (a changed tokenizer?); allow it with --allow-change data")
            if state.get("world_size") != world or state.get("global_batch") != global_batch:
                raise ConfigError(f"cannot resume from {resume_from}: it ran with {state.get('world_size')} processes "
                                  f"and global batch {state.get('global_batch')}, this run has {world} and {global_batch}")
        evals: dict[str, dict[str, float]] = dict(state.get("eval", {}))
        if "before" not in evals:
            evals["before"] = self._evaluate(base, tokenizer, eval_set, "before", out)

        if opts.gradient_checkpointing:
            self._enable_gradient_checkpointing(base)
        peft_model = self._apply_adapter(base)
        if resume_from is not None:
            self._load_adapter_weights(peft_model, resume_from / _ADAPTER)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        if not trainable:
            raise LlmtuneError("the adapter has no trainable parameters (check targets)")

        optimizer = self._optimizer(peft_model, trainable)
        warmup = round(opts.warmup * total_steps) if opts.warmup < 1 else int(opts.warmup)
        scheduler = self._scheduler(optimizer, warmup, total_steps)
        wrapped = _LossModule(peft_model, self)
        wrapped, optimizer = acc.prepare(wrapped, optimizer)
        start_step = 0
        history: list[dict[str, Any]] = []
        if resume_from is not None:
            optimizer.optimizer.load_state_dict(ckpt.load_state(resume_from, "optimizer"))
            scheduler.load_state_dict(ckpt.load_state(resume_from, "scheduler"))
            ckpt.load_rng(resume_from, rank)
            start_step = int(state["step"])
            history = list(state.get("history", []))

        run = {"fingerprint": fingerprint, "run": run_fp.to_dict(), "world_size": world, "global_batch": global_batch,
               "total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
        log_path = out / "log.jsonl"
        if acc.is_main_process:
            (out / "config.json").write_text(json.dumps({"options": opts.to_dict(), **run}, indent=1) + "\n")
            with open(log_path, "w") as fh:  # on resume: the log up to the checkpoint, then the new steps
                for rec in history:
                    fh.write(json.dumps(rec) + "\n")
                for event in events:  # damaged checkpoints skipped, crash leftovers cleaned up, a run replaced
                    fh.write(json.dumps({"step": start_step, **event.to_dict()}) + "\n")

        pad_id = tokenizer.pad_token_id
        labels_per_example = [_label_count(ex.labels) for ex in examples]
        stopped: str | None = None
        last_good: Path | None = resume_from
        step = start_step
        interrupted = [False]
        t_start = time.perf_counter()
        tokens_seen = 0

        def save_checkpoint(at: int) -> Path:
            return self._save_checkpoint(out, at, wrapped, optimizer, scheduler,
                                         {**run, "step": at, "history": history, "eval": evals})

        wrapped.train()
        with self._sigint_handler(interrupted), self._progress(total_steps, start_step) as progress:
            try:
                while step < total_steps:
                    epoch, k = divmod(step, steps_per_epoch)
                    order = self._order(epoch, n)
                    chunk = order[k * global_batch:(k + 1) * global_batch]
                    global_tokens = sum(labels_per_example[i] for i in chunk)
                    t0 = time.perf_counter()
                    local_sum = torch.zeros((), device=acc.device, dtype=torch.float32)
                    local_tok = 0
                    for j in range(opts.grad_accum):
                        lo = (j * world + rank) * opts.batch_size
                        batch_ids = chunk[lo:lo + opts.batch_size]
                        batch = collate([examples[i] for i in batch_ids], pad_id)
                        batch = {key: v.to(acc.device) for key, v in batch.items()}
                        local_tok += int(batch["attention_mask"].sum())
                        sync = contextlib.nullcontext() if j == opts.grad_accum - 1 else acc.no_sync(wrapped)
                        with sync:
                            loss_sum = wrapped(**batch)
                            # DDP averages gradients over processes: scale so the result is sum / global tokens
                            acc.backward(loss_sum * (world / max(global_tokens, 1)))
                        local_sum += loss_sum.detach().float()
                    total_sum = acc.reduce(local_sum, reduction="sum") if world > 1 else local_sum
                    loss = float(total_sum) / max(global_tokens, 1)
                    if not math.isfinite(loss):
                        stopped = f"non-finite loss ({loss}) at step {step + 1}"
                        optimizer.zero_grad(set_to_none=True)
                        break
                    grad_norm = None
                    if opts.max_grad_norm > 0:
                        grad_norm = float(acc.clip_grad_norm_(trainable, opts.max_grad_norm))
                        if not math.isfinite(grad_norm) and self._precision != "fp16":
                            stopped = f"non-finite gradient norm ({grad_norm}) at step {step + 1}"
                            optimizer.zero_grad(set_to_none=True)
                            break
                    lr = float(scheduler.get_last_lr()[0])
                    optimizer.step()
                    if not getattr(optimizer, "step_was_skipped", False):
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    tok_all = local_tok * world
                    tokens_seen += tok_all
                    dt = time.perf_counter() - t0
                    record: dict[str, Any] = {
                        "step": step, "epoch": epoch + (k + 1) / steps_per_epoch, "loss": loss, "lr": lr,
                        "grad_norm": grad_norm, "tokens": tok_all, "tokens_per_s": tok_all / dt if dt > 0 else None,
                        "memory_bytes": _memory_bytes(acc.device), "time_s": time.perf_counter() - t_start,
                    }
                    if opts.eval_every and step % opts.eval_every == 0 and step < total_steps:
                        record["eval"] = self._evaluate(acc.unwrap_model(wrapped).model, tokenizer, eval_set,
                                                        f"step-{step:06d}", out)
                        wrapped.train()
                    history.append(record)
                    if acc.is_main_process:
                        with open(log_path, "a") as fh:
                            fh.write(json.dumps(record) + "\n")
                    if progress is not None and (step % opts.log_every == 0 or step == total_steps):
                        progress(step, record)
                    if opts.save_every and step % opts.save_every == 0:
                        last_good = save_checkpoint(step)
                    self._on_step_end(step, record)
                    if self._stop_everywhere(interrupted[0]):
                        raise _StopRequested
            except (KeyboardInterrupt, _StopRequested):
                optimizer.zero_grad(set_to_none=True)
                path = save_checkpoint(step)
                if acc.is_main_process:
                    print(f"\ninterrupted after step {step}: checkpoint saved to {path}; "
                          f"resume with resume='auto' (CLI: --resume auto)", flush=True)
                raise KeyboardInterrupt(f"interrupted after step {step}; checkpoint {path}") from None

        final_model = acc.unwrap_model(wrapped).model
        adapter_dir: Path | None
        if stopped is not None:
            adapter_dir = (last_good / _ADAPTER) if last_good is not None else None
            if acc.is_main_process:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps({"step": step + 1, "event": "stopped", "reason": stopped,
                                         "last_good_checkpoint": str(last_good) if last_good else None}) + "\n")
                print(f"stopped: {stopped}; last good checkpoint: {last_good}", flush=True)
        else:
            adapter_dir = out / _ADAPTER
            self._save_adapter(final_model, tokenizer, adapter_dir)
            evals["after"] = self._evaluate(final_model, tokenizer, eval_set, "after", out)
        if not evals.get("before"):
            evals = {}
        result = TrainResult(adapter_dir=adapter_dir, history=history, eval=evals, output_dir=out,
                             stopped_early=stopped,
                             extra={"steps": step, "total_steps": total_steps, "world_size": world,
                                    "checkpoint_events": [e.to_dict() for e in events],
                                    "precision": self._precision,
                                    "trainable_parameters": sum(p.numel() for p in trainable),
                                    "seconds": time.perf_counter() - t_start})
        if acc.is_main_process:
            summary = {"adapter_dir": str(adapter_dir) if adapter_dir else None, "eval": evals,
                       "stopped_early": stopped, **result.extra}
            (out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
        acc.wait_for_everyone()
        return result

    # ------------------------------------------------------------------ loop pieces
    def _order(self, epoch: int, n: int) -> list[int]:
        """The data order of ``epoch``: a permutation drawn from its own generator (seed, epoch)."""
        g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _scheduler(self, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> Any:
        from transformers import get_scheduler

        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[self.options.scheduler]
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)

    def _stop_everywhere(self, local: bool) -> bool:
        """True on every process when any process saw Ctrl-C (so they all stop at the same step)."""
        acc = self._accelerator
        if acc.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=acc.device)
        return bool(acc.reduce(flag, reduction="sum").item() > 0)

    @contextlib.contextmanager
    def _sigint_handler(self, flag: list[bool]) -> Iterator[None]:
        """First Ctrl-C: finish the step, save, stop. Second: stop at once (still saving the last step)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if flag[0]:
                raise KeyboardInterrupt
            flag[0] = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def _progress(self, total: int, start: int) -> Iterator[Any]:
        """A rich progress bar (main process only) showing loss, tokens/s and memory; yields an update function."""
        if not (self.options.progress and self._accelerator.is_main_process):
            yield None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       TextColumn("{task.fields[info]}"), transient=False)
        task = bar.add_task("train", total=total, completed=start, info="")

        def update(step: int, rec: dict[str, Any]) -> None:
            tps = rec.get("tokens_per_s") or 0.0
            info = f"loss {rec['loss']:.4f}  {tps:,.0f} tok/s  mem {rec['memory_bytes'] / 2**20:,.0f} MiB"
            bar.update(task, completed=step, info=info)

        with bar:
            yield update

    def _load_adapter_weights(self, peft_model: nn.Module, adapter_dir: Path) -> None:
        if self.options.method == "bottleneck":
            from llmtune.trainers.methods.bottleneck import load_bottleneck_weights

            load_bottleneck_weights(peft_model, adapter_dir)
            return
        from peft import set_peft_model_state_dict
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise DamagedFileError(f"{adapter_dir / 'adapter_model.safetensors'}: unreadable ({exc})") from None
        result = set_peft_model_state_dict(peft_model, weights)
        missing = [k for k in getattr(result, "unexpected_keys", [])]
        if missing:
            raise ConfigError(f"checkpoint adapter {adapter_dir} does not fit this model: unexpected {missing[:5]}")

    def _save_adapter(self, model: nn.Module, tokenizer: Any, final: Path) -> None:
        """Atomically write the adapter (PEFT format) and the tokenizer to ``final``."""
        acc = self._accelerator
        if acc.is_main_process:
            tmp = ckpt.begin(final)
            self._write_adapter(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            ckpt.commit(final)
        acc.wait_for_everyone()

    def _save_checkpoint(self, out: Path, step: int, wrapped: nn.Module, optimizer: Any, scheduler: Any,
                         state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically (every process adds its RNG state), prune old ones."""
        acc = self._accelerator
        final = ckpt.step_dir(out, step)
        if acc.is_main_process:
            tmp = ckpt.begin(final)
        acc.wait_for_everyone()
        tmp = ckpt.tmp_dir_for(final)
        ckpt.save_rng(tmp, acc.process_index)
        if acc.is_main_process:
            model = acc.unwrap_model(wrapped).model
            self._write_adapter(model, tmp / _ADAPTER)
            ckpt.save_state(tmp, "optimizer", optimizer.optimizer.state_dict() if hasattr(optimizer, "optimizer")
                            else optimizer.state_dict())
            ckpt.save_state(tmp, "scheduler", scheduler.state_dict())
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit(final, _jsonable(state))
            ckpt.prune(out, self.options.keep_checkpoints, current=final)
        acc.wait_for_everyone()
        return final
