"""Backend ``unsloth``: Unsloth loads the model and adds LoRA; the shared recipe does the rest.

Everything that is not Unsloth-specific (options, data, templates, the Accelerate loop, evaluation,
checkpoints, logs, outputs) is the recipe's (`llmtune.trainers.loop`); `UnslothBackend` implements the
`TrainerBackend` protocol:

* `load`: ``FastLanguageModel.from_pretrained`` (QLoRA through ``load_in_4bit``, i.e. NF4 + double quant);
* `prepare` / `apply_method`: ``FastLanguageModel.get_peft_model`` with ``use_gradient_checkpointing="unsloth"``
  (Unsloth's checkpointing, which offloads activations on a GPU);
* `loss`: the model's own loss (Unsloth's fused cross-entropy on a GPU, its chunked one on the CPU fallback);
* `generation`: switches the model to Unsloth's inference mode around generation and back.

Unsloth patches transformers, PEFT and TRL when it is imported, so it must be imported before them. The
module itself imports neither (``llmtune backends`` must stay fast); the trainer imports Unsloth when it is
constructed, and warns, saying what that costs, if transformers/PEFT/TRL were imported first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from llmtune.core.errors import BackendUnavailableError, ConfigError, InvalidOptionError
from llmtune.core.versions import installed_version, release
from llmtune.data.examples import IGNORE_INDEX
from llmtune.trainers.backend import BackendContext, TrainerBackend
from llmtune.trainers.base import RecipeTrainer
from llmtune.trainers.options import TrainOptions

#: The oldest Unsloth whose ``import`` works without a GPU (its CPU fallback: stock transformers + PEFT).
MIN_CPU_FALLBACK = (2026, 10, 9)
#: Newest versions Unsloth's pins allow (unsloth 2026.10.9: ``transformers<=5.17.0``, ``trl<=1.15.0``).
MAX_TRANSFORMERS = (5, 17, 0)
MAX_TRL = (1, 15, 0)
#: Modules Unsloth patches when it is imported; importing one of them first loses those patches.
PATCHED_MODULES = ("transformers", "peft", "trl")


class UnslothImportOrderWarning(UserWarning):
    """transformers, PEFT or TRL was imported before Unsloth: some of Unsloth's patches may not apply."""


def _version_tuple(version: str) -> tuple[int, ...]:
    """``"2026.10.9"`` -> ``(2026, 10, 9)``; ``"5.17.0.dev0"`` -> ``(5, 17, 0)`` (at most three numbers)."""
    return release(version)[:3]


_installed = installed_version  # a module attribute, so tests can stand in other versions


def _fmt(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def import_order_problem(modules: Mapping[str, Any] | None = None) -> str | None:
    """What importing Unsloth now would lose, given the loaded ``modules`` (default ``sys.modules``), or None."""
    loaded = sys.modules if modules is None else modules
    if "unsloth" in loaded:
        return None
    early = [m for m in PATCHED_MODULES if m in loaded]
    if not early:
        return None
    return (f"llmtune: {', '.join(early)} was imported before Unsloth. Unsloth patches these libraries when it is "
            "imported, so classes loaded before that keep their stock code: on a GPU, expect slower steps and "
            "more memory than Unsloth advertises (up to plain-PEFT speed and memory for the affected parts); on "
            "the CPU fallback nothing is lost (it runs stock transformers anyway). Create the trainer "
            "(llmtune.get_trainer('lora', backend='unsloth')) or `import unsloth` before anything imports "
            "transformers.")


def import_unsloth() -> Any:
    """Import Unsloth (first, if possible) and return ``FastLanguageModel``; warn if it came too late."""
    if "unsloth" not in sys.modules:
        problem = import_order_problem()
        if problem is not None:
            warnings.warn(problem, UnslothImportOrderWarning, stacklevel=3)
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no network calls from a library
        with warnings.catch_warnings():
            # Unsloth's own import-order warning says the same as ours, without the cost on CPU.
            warnings.filterwarnings("ignore", message=".*Unsloth should be imported before.*")
            try:
                import unsloth  # noqa: F401
            except NotImplementedError as exc:  # no accelerator and no (or a disabled) CPU fallback
                raise BackendUnavailableError(
                    f"trainer 'lora' backend 'unsloth' cannot run here: {exc} (Unsloth >= "
                    f"{_fmt(MIN_CPU_FALLBACK)} trains on CPU unless UNSLOTH_DISABLE_CPU_FALLBACK=1)") from exc
    from unsloth import FastLanguageModel

    return FastLanguageModel


#: methods the unsloth backend refuses, and why (shown by the support matrix too)
REFUSED: dict[str, str] = {
    "bottleneck": "Bottleneck adapters hook the attention/MLP modules, and Unsloth's fast paths run its own "
                  "kernels on those modules' weights without calling them, so the adapters would be skipped; "
                  "use backend='peft'",
}
NO_PACKING = ("on the unsloth backend the loss is Unsloth's own forward, which is not given the per-example "
              "block mask, so packed examples would attend to each other; use backend='peft' for packing")


@dataclasses.dataclass(frozen=True)
class UnslothLoraOptions(TrainOptions):
    """The recipe's options; Unsloth supports ``method="lora"`` only and NF4 as its quantizer.

    ``dropout`` defaults to 0 here (Unsloth's fast LoRA kernels need it; any other value makes Unsloth patch
    everything except the LoRA matrices). ``loss_chunk_tokens`` is not used: Unsloth computes the loss.
    """

    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method in REFUSED:
            raise InvalidOptionError(f"option method={self.method!r}: not on the unsloth backend. "
                                     f"{REFUSED[self.method]}", field="method")
        if self.method != "lora":
            raise InvalidOptionError(f"option method={self.method!r}: the unsloth backend trains LoRA only; use "
                                     "backend='peft' for DoRA, IA3, prompt and prefix tuning", field="method")
        if self.rslora or self.init != "default":
            raise InvalidOptionError("options rslora / init: the unsloth backend hands only rank, alpha and dropout "
                                     "to FastLanguageModel.get_peft_model; use backend='peft' for rsLoRA, PiSSA, "
                                     "OLoRA and LoftQ", field="rslora" if self.rslora else "init")
        if self.packing:
            raise InvalidOptionError(f"option packing=True: {NO_PACKING}", field="packing")
        if self.upcast_embeddings:
            raise InvalidOptionError("option upcast_embeddings=True: Unsloth chooses the dtypes of the 4-bit "
                                     "model itself; use backend='peft' for PEFT's kbit recipe",
                                     field="upcast_embeddings")
        q = self.quantizer
        if q is not None:
            if q.name != "nf4":
                raise InvalidOptionError(
                    f"option quantizer: {q.describe()} cannot be used with the unsloth backend, which quantizes "
                    "with bitsandbytes NF4 (load_in_4bit) only; use llmtune.get_quantizer('nf4'), or "
                    "backend='peft' for other quantizers", field="quantizer")
            fixed = {"double_quant": True, "blocksize": 64, "quant_storage": "uint8", "skip_modules": ("lm_head",)}
            for field, want in fixed.items():
                have = getattr(q.options, field, want)
                if have != want:
                    raise InvalidOptionError(
                        f"option quantizer: nf4 {field}={have!r} is not what Unsloth's load_in_4bit does "
                        f"({field}={want!r}); leave it at its default or use backend='peft'", field="quantizer")


def unsloth_unavailable_reason() -> str | None:
    """Version pins and the CPU fallback, from package metadata only (no import of Unsloth)."""
    unsloth_v = _installed("unsloth")
    if unsloth_v is None:
        return "needs unsloth: pip install 'llmtune[unsloth]'"
    if _installed("unsloth_zoo") is None:
        return "needs unsloth_zoo (a dependency of unsloth): pip install 'llmtune[unsloth]'"
    tf = _installed("transformers")
    if tf is not None and _version_tuple(tf) > MAX_TRANSFORMERS:
        return (f"unsloth {unsloth_v} supports transformers <= {_fmt(MAX_TRANSFORMERS)}, this environment has "
                f"{tf}: install llmtune[unsloth] in its own environment (it pins the stack)")
    trl = _installed("trl")
    if trl is None:
        return "needs trl (a dependency of unsloth): pip install 'llmtune[unsloth]'"
    if _version_tuple(trl) > MAX_TRL:
        return (f"unsloth {unsloth_v} supports trl <= {_fmt(MAX_TRL)}, this environment has {trl}: "
                "pip install 'trl<=1.15'")
    if not torch.cuda.is_available():
        if _version_tuple(unsloth_v) < MIN_CPU_FALLBACK:
            return (f"no CUDA GPU, and unsloth {unsloth_v} needs one (its CPU fallback starts at "
                    f"{_fmt(MIN_CPU_FALLBACK)}): pip install 'unsloth>={_fmt(MIN_CPU_FALLBACK)}'")
        if os.environ.get("UNSLOTH_DISABLE_CPU_FALLBACK") == "1":
            return "no CUDA GPU, and UNSLOTH_DISABLE_CPU_FALLBACK=1 turns Unsloth's CPU fallback off"
    return None


class UnslothBackend(TrainerBackend):
    """LoRA / QLoRA with Unsloth's model loading, kernels, checkpointing and loss."""

    name: ClassVar[str] = "unsloth"
    methods: ClassVar[tuple[str, ...]] = ("lora",)
    objectives: ClassVar[tuple[str, ...]] = ("sft",)
    quantizers: ClassVar[tuple[str, ...] | None] = ("nf4",)
    packing: ClassVar[bool] = False   # NO_PACKING says why
    refused: ClassVar[dict[str, str]] = REFUSED
    requires: ClassVar[tuple[str, ...]] = ("torch", "transformers", "peft", "unsloth")
    extra: ClassVar[str | None] = "unsloth"

    def __init__(self) -> None:
        # Import now: the earliest moment we know Unsloth will be used (before the loop imports transformers).
        self._fast = import_unsloth()
        self._tmp_model_dir: Path | None = None
        self._gc_mode: str | bool = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return unsloth_unavailable_reason()

    @classmethod
    def options_class(cls, objective_options: type) -> type:
        return UnslothLoraOptions

    def close(self) -> None:
        if self._tmp_model_dir is not None:
            shutil.rmtree(self._tmp_model_dir, ignore_errors=True)
            self._tmp_model_dir = None

    def _model_dir(self, model: Any, tokenizer: Any) -> tuple[str, bool]:
        """(what to hand to Unsloth, whether it is a local directory); a module is saved to a temp dir."""
        if isinstance(model, (str, os.PathLike)):
            path = Path(model).expanduser()
            if path.is_dir():
                if not (path / "config.json").is_file():
                    raise ConfigError(f"model directory {path} has no config.json (not a transformers model)")
                return str(path), True
            if os.path.exists(path):
                raise ConfigError(f"model {model!s} is a file; give a model directory or a hub id")
            return str(model), False  # a hub id: Unsloth resolves (and may remap) it
        if isinstance(model, nn.Module):
            if type(model).__name__.startswith("Peft") or hasattr(model, "peft_config"):
                raise ConfigError("model already has a PEFT adapter; pass the base model (or its directory)")
            if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
                raise ConfigError("model is already quantized; Unsloth quantizes at load time: pass the 16/32-bit "
                                  "model and quantizer=get_quantizer('nf4')")
            save = getattr(model, "save_pretrained", None)
            if save is None:
                raise ConfigError(f"Unsloth loads models from a directory; {type(model).__name__} has no "
                                  "save_pretrained, so give a transformers model or its directory")
            if tokenizer is None:
                raise ConfigError("model is an nn.Module: pass tokenizer= as well (or give a model path)")
            tmp = Path(tempfile.mkdtemp(prefix="llmtune-unsloth-"))
            self._tmp_model_dir = tmp
            save(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            return str(tmp), True
        raise ConfigError(f"model must be a local path, a hub id or a torch.nn.Module, not {type(model).__name__}")

    def load(self, model: Any, tokenizer: Any, ctx: BackendContext) -> tuple[Any, Any]:
        """``FastLanguageModel.from_pretrained``: 16-bit, or NF4 (``load_in_4bit``) when given a quantizer."""
        opts = ctx.options
        self._gc_mode = False
        name, local = self._model_dir(model, tokenizer)
        dtype = ctx.base_dtype or torch.float32
        kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
        if ctx.device.type == "cuda":  # this process's GPU (one per process under accelerate launch)
            index = ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
            kwargs["device_map"] = {"": index}
        try:
            loaded, loaded_tok = self._fast.from_pretrained(
                model_name=name, max_seq_length=opts.max_length, dtype=dtype,
                load_in_4bit=opts.quantizer is not None, load_in_8bit=False,
                use_gradient_checkpointing="unsloth" if opts.gradient_checkpointing else False,
                trust_remote_code=opts.trust_remote_code, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Unsloth could not load model {name!r}: {exc}") from exc
        if opts.quantizer is not None and not getattr(loaded, "is_loaded_in_4bit", False):
            warnings.warn("llmtune: Unsloth loaded the model in 16 bits although a 4-bit quantizer was given "
                          "(its CPU fallback does this when bitsandbytes 4-bit does not work on this CPU)",
                          RuntimeWarning, stacklevel=2)
        tok = tokenizer if tokenizer is not None else loaded_tok
        if tok is None:
            raise ConfigError("no tokenizer: pass tokenizer= (the model directory has none)")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        for p in loaded.parameters():
            p.requires_grad_(False)
        if getattr(loaded, "config", None) is not None:
            loaded.config.use_cache = False
        return loaded, tok

    def prepare(self, model: Any, ctx: BackendContext) -> None:
        """Unsloth's checkpointing is switched on by `get_peft_model` (called next, in `apply_method`)."""
        if ctx.options.gradient_checkpointing:
            self._gc_mode = "unsloth"

    def _targets(self, model: nn.Module, targets: Any) -> list[str]:
        """Module names for Unsloth: ``"all-linear"`` becomes every linear leaf name except the output head."""
        if not isinstance(targets, str) or targets != "all-linear":
            return [targets] if isinstance(targets, str) else list(targets)
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        names: list[str] = []
        for _full, module in model.named_modules():
            if module is head or "lora_" in _full or _full.endswith("base_layer"):
                continue
            if isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
                leaf = _full.rsplit(".", 1)[-1]
                if leaf not in names and leaf != "lm_head":
                    names.append(leaf)
        if not names:
            raise ConfigError(f"targets='all-linear': {type(model).__name__} has no linear layers besides its head")
        return names

    def apply_method(self, model: Any, method: Any, ctx: BackendContext) -> Any:
        """``FastLanguageModel.get_peft_model``: LoRA with Unsloth's kernels and (optionally) its checkpointing."""
        opts = ctx.options
        try:
            return self._fast.get_peft_model(
                model, r=opts.rank, lora_alpha=opts.alpha, lora_dropout=opts.dropout, bias="none",
                target_modules=self._targets(model, opts.targets), use_gradient_checkpointing=self._gc_mode,
                random_state=opts.seed, max_seq_length=opts.max_length)
        except (ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"Unsloth could not add LoRA to {type(model).__name__}: {exc}") from exc

    def loss(self, model: Any, batch: Mapping[str, torch.Tensor], ctx: BackendContext) -> torch.Tensor:
        """SUM of next-token cross-entropies, from the model's own (Unsloth's) loss.

        ``num_items_in_batch`` makes the model divide by the label count we give (at least 1), so multiplying
        back gives the exact sum, and a batch without labels gives 0 instead of NaN.
        """
        labels = batch["labels"]
        count = (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                    use_cache=False, num_items_in_batch=count)
        loss = out.loss if hasattr(out, "loss") else out[0]
        return loss.float() * count

    @contextlib.contextmanager
    def generation(self, model: Any) -> Iterator[Any]:
        """Generation in Unsloth's inference mode, then back to training mode (with the same checkpointing)."""
        target: nn.Module = getattr(model, "module", model)
        self._fast.for_inference(target)
        try:
            yield target
        finally:
            self._fast.for_training(target, use_gradient_checkpointing=bool(self._gc_mode))


class UnslothSftTrainer(RecipeTrainer):
    """``sft`` on the ``unsloth`` backend (LoRA / QLoRA)."""

    name: ClassVar[str] = "sft"
    backend: ClassVar[str] = "unsloth"
    objective: ClassVar[str] = "sft"
    engine: ClassVar[type[TrainerBackend]] = UnslothBackend
    Options: ClassVar[type] = UnslothLoraOptions
    options: UnslothLoraOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        import_unsloth()  # before anything imports transformers


class UnslothLoraTrainer(UnslothSftTrainer):
    """``lora`` on the ``unsloth`` backend, kept for existing callers."""

    name: ClassVar[str] = "lora"
