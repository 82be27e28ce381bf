"""The options of every recipe trainer (`TrainOptions`), and those only pretraining adds (`PretrainOptions`).

One frozen dataclass per objective, checked in ``__post_init__``; a backend may subclass it to narrow what it
accepts (``UnslothOptions``). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from llmtune.core.errors import InvalidOptionError
from llmtune.core.interfaces import Quantizer
from llmtune.core.options import check_choice, check_positive, check_type
from llmtune.data.templates import TEMPLATES

TRAIN_ON = ("assistant", "last_turn", "everything")
#: Optimizer names, the same as `llmtune.memory.estimate_training(optimizer=...)` knows (less adafactor).
OPTIMIZERS = ("adamw", "adamw_8bit", "sgd", "sgd_momentum")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
#: How several processes split the work: "ddp" (replicas, Accelerate) or "fsdp" (torch FSDP2 shards).
DISTRIBUTED = ("ddp", "fsdp")


#: `InvalidOptionError` unless a value is a finite number of a kind that is > 0 (or >= 0): the core's one check.
positive = check_positive


#: Upper bounds of options whose larger values crash a run instead of failing cleanly.
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024


def _at_most(field: str, value: int, most: int, why: str) -> None:
    if value > most:
        raise InvalidOptionError(f"option {field}={value!r} must be at most {most} ({why})", field=field)


def _check_targets(opts: Any) -> None:
    targets = opts.targets
    if isinstance(targets, list):
        targets = tuple(targets)
        object.__setattr__(opts, "targets", targets)
    if isinstance(targets, str):
        if not targets:
            raise InvalidOptionError("option targets='' is empty; use 'all-linear' or a list of module names",
                                     field="targets")
    elif not (isinstance(targets, tuple) and targets and all(isinstance(t, str) and t for t in targets)):
        raise InvalidOptionError(f"option targets={targets!r} must be 'all-linear' or a non-empty list of "
                                 "module names such as ['q_proj', 'v_proj']", field="targets")


def _check_quantizer(q: object) -> None:
    if q is None:
        return
    if not isinstance(q, Quantizer):
        raise InvalidOptionError(f"option quantizer={q!r} must be a Quantizer, e.g. llmtune.get_quantizer('nf4')",
                                 field="quantizer")
    if not type(q).trainable:
        raise InvalidOptionError(f"option quantizer: {q.describe()} cannot be trained on (trainable=False); "
                                 "use nf4, fp4 or int8", field="quantizer")


_LORA_ONLY = (("rslora", False), ("init", "default"), ("loraplus_ratio", None))


def method_options(opts: Any) -> Any:
    """The typed options of ``opts.method`` (see `TrainOptions.method_options`)."""
    if opts.method in ("lora", "dora"):
        from llmtune.trainers.methods.lora import lora_variant

        return lora_variant(opts, dora=opts.method == "dora")
    if opts.method == "ia3":
        from llmtune.trainers.methods.ia3 import ia3_options

        return ia3_options(opts)
    if opts.method == "prefix_tuning":
        from llmtune.trainers.methods.peft_methods import PrefixTuningOptions

        return PrefixTuningOptions(num_virtual_tokens=opts.num_virtual_tokens)
    if opts.method == "bottleneck":
        from llmtune.trainers.methods.bottleneck_options import from_trainer_options

        return from_trainer_options(opts)
    return None


def _check_method(opts: Any) -> None:
    """The method's own options (typed dataclasses in `llmtune.trainers.methods`) and their combinations."""
    import re

    from llmtune.core.errors import ConfigError
    from llmtune.trainers.methods import METHODS
    from llmtune.trainers.methods.peft_methods import check_quantized_base

    if isinstance(opts.bottleneck_sites, (str, list)):
        sites = (opts.bottleneck_sites,) if isinstance(opts.bottleneck_sites, str) else tuple(opts.bottleneck_sites)
        object.__setattr__(opts, "bottleneck_sites", sites)
    for field, default in _LORA_ONLY:
        if getattr(opts, field) != default and opts.method not in ("lora", "dora"):
            raise InvalidOptionError(f"option {field}={getattr(opts, field)!r} applies to method 'lora' or 'dora', "
                                     f"not {opts.method!r}")
    try:
        method_options(opts)
    except InvalidOptionError as exc:  # name the trainer's option (bottleneck_size), not the dataclass field
        message = re.sub(r"option (size|placement|sites|non_linearity|scaling)\b", r"option bottleneck_\1", str(exc))
        raise InvalidOptionError(message) from None
    if opts.loraplus_ratio is not None:
        positive("loraplus_ratio", opts.loraplus_ratio, (int, float))
        if opts.loraplus_ratio < 1:
            raise InvalidOptionError(f"option loraplus_ratio={opts.loraplus_ratio!r} must be >= 1")
    if opts.quantizer is not None:
        if opts.init == "loftq":
            raise InvalidOptionError("option init='loftq' replaces the base weights by their quantized "
                                     f"approximation itself; leave quantizer unset (got {opts.quantizer.describe()})")
        try:
            check_quantized_base(opts.init, quantized=True)
        except ConfigError as exc:
            raise InvalidOptionError(f"option init={opts.init!r}: {exc}") from None
    if opts.packing and opts.method in METHODS and opts.method in _NO_PACKING:
        raise InvalidOptionError(f"option packing=True with method={opts.method!r}: the virtual tokens would be "
                                 "shared by every packed example; use packing=False")


#: methods whose virtual tokens every packed example would share (`Method.packing` is False for them)
_NO_PACKING = ("prompt_tuning", "prefix_tuning")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Options of every recipe trainer; each can also be passed to ``train(...)`` to override it for one run."""

    # method: which parameters train
    method: str = "lora"                     #: a method name: see llmtune.trainers.methods.METHODS
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
    distributed: str = "ddp"                 #: with several processes: "ddp" (replicas) or "fsdp" (FSDP2 shards)
    # optimisation
    optimizer: str = "adamw"                 #: "adamw", "adamw_8bit" (bitsandbytes), "sgd", "sgd_momentum"
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
    divergence_factor: float = 10.0          #: stop when a loss exceeds this x its recent median (0: NaN/inf only)
    num_threads: int | str = "auto"          #: torch CPU threads during the run: "auto" (measured rule) or a count
    # data
    template: str = "llama3"                 #: "llama3", "llama3.1", "chatml", "alpaca" or "tokenizer" (its own)
    max_length: int = 512                    #: longest example (sft); block length (pretrain)
    packing: bool = False
    train_on_prompt: bool = False
    train_on: str = "assistant"              #: "assistant" (every answer), "last_turn" or "everything"
    system_prompt: str | None = None         #: the system turn of records that have none
    # evaluation, checkpoints, logs
    eval_every: int = 0                      #: also evaluate every N steps (0: only before and after)
    early_stopping_patience: int = 0         #: stop after N periodic evaluations without a lower validation loss
    eval_examples: int = 64                  #: held-out examples (pretrain: blocks) per evaluation (0 = all)
    eval_batch_size: int = 8
    max_new_tokens: int = 64
    save_every: int = 0                      #: checkpoint every N steps (0: only on Ctrl-C)
    keep_checkpoints: int = 2                #: newest checkpoints kept (0 = all)
    seed: int = 0
    output_dir: str = "llmtune-output"
    log_every: int = 1                       #: progress-callback period in steps (log.jsonl gets every step)
    progress: bool = True                    #: let the CLI attach its progress bar (the library prints nothing)

    def __post_init__(self) -> None:
        from llmtune.trainers.methods import METHODS

        check_choice("method", self.method, tuple(METHODS))
        positive("rank", self.rank)
        positive("alpha", self.alpha, (int, float))
        check_type("dropout", self.dropout, (int, float))
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"option dropout={self.dropout!r} must be in [0, 1)", field="dropout")
        _check_targets(self)
        positive("num_virtual_tokens", self.num_virtual_tokens)
        _check_quantizer(self.quantizer)
        for name in ("upcast_embeddings", "gradient_checkpointing", "trust_remote_code", "packing",
                     "train_on_prompt", "progress"):
            check_type(name, getattr(self, name), bool)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("distributed", self.distributed, DISTRIBUTED)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        positive("lr", self.lr, (int, float))
        positive("epochs", self.epochs)
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        positive("batch_size", self.batch_size)
        positive("grad_accum", self.grad_accum)
        positive("warmup", self.warmup, (int, float), zero_ok=True)
        if self.warmup >= 1 and float(self.warmup) != int(self.warmup):
            raise InvalidOptionError(f"option warmup={self.warmup!r}: a fraction must be < 1, a step count whole",
                                     field="warmup")
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        for name in ("weight_decay", "max_grad_norm", "divergence_factor"):
            positive(name, getattr(self, name), (int, float), zero_ok=True)
        if 0 < self.divergence_factor <= 1:
            raise InvalidOptionError(f"option divergence_factor={self.divergence_factor!r} must be 0 (off) or > 1",
                                     field="divergence_factor")
        positive("loss_chunk_tokens", self.loss_chunk_tokens, zero_ok=True)
        if self.num_threads != "auto":
            positive("num_threads", self.num_threads)
            _at_most("num_threads", int(self.num_threads), MAX_THREADS, "more threads than cores only slow a run down")
        check_choice("template", self.template, TEMPLATES)
        positive("max_length", self.max_length)
        check_choice("train_on", self.train_on, TRAIN_ON)
        if self.system_prompt is not None:
            check_type("system_prompt", self.system_prompt, str)
        _check_method(self)
        for name in ("eval_every", "eval_examples", "save_every", "keep_checkpoints", "seed",
                     "early_stopping_patience"):
            positive(name, getattr(self, name), zero_ok=True)
        _at_most("seed", self.seed, MAX_SEED, "NumPy's seed range, which the run seeds with it")
        for name in ("eval_batch_size", "max_new_tokens", "log_every"):
            positive(name, getattr(self, name))
        check_type("output_dir", self.output_dir, (str, os.PathLike))

    def method_options(self) -> Any:
        """The typed options of the method (`LoraVariantOptions`, `IA3Options`, `PrefixTuningOptions`,
        `BottleneckOptions`), or None for prompt tuning and full fine-tuning."""
        return method_options(self)

    def replace(self, **changes: Any) -> TrainOptions:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (the quantizer becomes its description)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        q = out["quantizer"]
        out["quantizer"] = None if q is None else {"name": q.name, "backend": q.backend,
                                                   **jsonable(dataclasses.asdict(q.options))}
        out["targets"] = out["targets"] if isinstance(out["targets"], str) else list(out["targets"])
        out["bottleneck_sites"] = list(out["bottleneck_sites"])
        out["output_dir"] = str(out["output_dir"])
        return out


@dataclasses.dataclass(frozen=True)
class PretrainOptions(TrainOptions):
    """`TrainOptions` for next-token pretraining on raw text: every weight trains by default.

    Text files are read ``chunk_bytes`` at a time, tokenized, joined with the tokenizer's eos between
    documents (lines of a ``.jsonl``'s ``text_field``, or whole ``.txt`` files) and cut into blocks of
    ``max_length`` tokens. A model given as a config (or a directory with only ``config.json``) starts from a
    random initialisation drawn from ``seed``.
    """

    method: str = "full"
    lr: float = 3e-3
    warmup: float = 0.05
    weight_decay: float = 0.01
    max_length: int = 64
    chunk_bytes: int = 1 << 16               #: characters of text read and tokenized at a time
    text_field: str = "text"                 #: the field of .jsonl/.json records that holds the text

    def __post_init__(self) -> None:
        super().__post_init__()
        positive("chunk_bytes", self.chunk_bytes)
        check_type("text_field", self.text_field, str)


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (unknown objects become their ``str``)."""
    return json.loads(json.dumps(obj, default=str))
