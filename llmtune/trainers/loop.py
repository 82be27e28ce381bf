"""The recipe every trainer shares: `setup` -> `train` (one `train_step` at a time) -> `finish`.

Run state lives in one `RunState`, passed explicitly. What differs between trainers is plugged in:
the objective (data and loss: `llmtune.trainers.objectives`), the method (which parameters train:
`llmtune.trainers.methods`) and the backend (load/prepare/apply/loss/save: `llmtune.trainers.backend`).

What the loop promises, whatever is plugged in:

* the same code runs on one CPU, one GPU, or many under ``accelerate launch`` (DDP): a step's data is a
  function of seed and step, so every process knows the global batch;
* the loss is the exact token mean over the whole global batch (all micro-batches, all processes);
* checkpoints hold everything exact resume needs (weights the method trains, optimizer, scheduler, RNG at
  the step boundary, step); a second Ctrl-C cannot land between the optimizer step and the step counter;
* the NaN/divergence guard stops the run and names the newest checkpoint whose *next* step was finite and
  not divergent (a checkpoint followed by a bad step is deleted: it is not good);
* every report goes through callbacks (`llmtune.trainers.callbacks`); ``OUT/log.jsonl`` is one of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmtune.core.errors import ConfigError, LlmtuneError, OutputDirError
from llmtune.core.results import TrainResult
from llmtune.trainers import _checkpoint as ckpt
from llmtune.trainers.backend import BackendContext, TrainerBackend
from llmtune.trainers.callbacks import CallbackList, JsonlLogger
from llmtune.trainers.callbacks_tasks import VllmCheck
from llmtune.trainers.objectives.base import EvalData, Objective, TrainData
from llmtune.trainers.options import jsonable

#: Losses the divergence guard compares a step with (their median).
DIVERGENCE_WINDOW = 20
#: Options that do not change what is trained: changing them keeps the run (and its output_dir) the same.
NOT_RUN_IDENTITY = frozenset({"eval_every", "eval_examples", "eval_batch_size", "max_new_tokens", "save_every",
                              "keep_checkpoints", "output_dir", "log_every", "progress", "gradient_checkpointing",
                              "loss_chunk_tokens", "num_threads", "early_stopping_patience"})


class _StopRequested(Exception):
    """Internal: raised at a step boundary when Ctrl-C was pressed (on any process)."""


class Signals:
    """Ctrl-C (and SIGTERM, the same): the first press stops at the next step boundary; the second stops at once,
    except inside a critical section (optimizer step .. step counter), which it waits for."""

    def __init__(self) -> None:
        self.requested = False
        self.critical = 0
        self.abort_pending = False
        self.terminated = False     # the stop came from SIGTERM: re-raised as `Terminated` (exit 143)

    def interrupt(self, message: str = "") -> KeyboardInterrupt:
        from llmtune.core.signals import Terminated

        return Terminated(message) if self.terminated else KeyboardInterrupt(message)

    def handler(self, signum: int, frame: Any) -> None:
        self.terminated = self.terminated or signum == signal.SIGTERM
        if not self.requested:
            self.requested = True
        elif self.critical:
            self.abort_pending = True
        else:
            raise self.interrupt()

    @contextlib.contextmanager
    def critical_section(self) -> Iterator[None]:
        self.critical += 1
        try:
            yield
        finally:
            self.critical -= 1
        if self.abort_pending and not self.critical:
            self.abort_pending = False
            raise self.interrupt()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclasses.dataclass
class RunState:
    """Everything one run knows; the loop's functions read and update it, callbacks read it."""

    options: Any
    objective: Objective
    backend: TrainerBackend
    ctx: BackendContext
    acc: Any
    out: Path
    callbacks: CallbackList
    num_threads: int
    threads_reason: str
    tokenizer: Any = None
    model: Any = None               # the model being trained (after the method), unwrapped
    wrapped: Any = None             # what Accelerate prepared (DDP wraps it)
    optimizer: Any = None
    scheduler: Any = None
    trainable: list[Any] = dataclasses.field(default_factory=list)
    data: TrainData | None = None
    eval: EvalData | None = None
    global_batch: int = 0
    steps_per_epoch: int | None = None
    total_steps: int = 0
    fingerprint: str = ""
    resume_from: Path | None = None
    resumed: dict[str, Any] = dataclasses.field(default_factory=dict)
    run_fingerprint: Any = None     # `_checkpoint.Fingerprint`: what makes this run this run (run.json)
    lock: Any = None                # `llmtune.core.lock.OutputLock` of ``out`` (main process)
    allow_changes: tuple[str, ...] = ()
    checkpoint_events: list[Any] = dataclasses.field(default_factory=list)   # `_checkpoint.CheckpointEvent`s
    step: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    last_good: Path | None = None   # newest checkpoint whose next step was finite and not divergent
    pending: Path | None = None     # newest checkpoint, not yet confirmed by the step after it
    stopped: str | None = None
    early_stopped: str | None = None    # validation loss stopped improving (a normal end: the result is saved)
    rng: dict[str, Any] | None = None   # RNG states at the last step boundary
    signals: Signals = dataclasses.field(default_factory=Signals)
    started: bool = False           # callbacks got on_train_start (evaluations before it are replayed then)
    t_start: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def is_main_process(self) -> bool:
        return bool(self.acc.is_main_process)

    @property
    def world(self) -> int:
        return int(self.acc.num_processes)

    @property
    def run_info(self) -> dict[str, Any]:
        run = self.run_fingerprint.to_dict() if self.run_fingerprint is not None else None
        return {"fingerprint": self.fingerprint, "run": run, "world_size": self.world,
                "global_batch": self.global_batch, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch}


class _LossModule(nn.Module):
    """What Accelerate prepares (and DDP wraps): model + loss, so the loss runs inside the wrapped forward."""

    def __init__(self, model: nn.Module, state: RunState) -> None:
        super().__init__()
        self.model = model
        self._state = [state]  # a list, so nn.Module does not register it

    def forward(self, _call: Any = None, **batch: torch.Tensor) -> Any:
        """The loss of ``batch``; or ``_call(model)`` (FSDP: inside the root's forward, its weights gathered)."""
        if _call is not None:
            return _call(self.model)
        s = self._state[0]
        return s.objective.loss(s.backend, self.model, batch, s.ctx)


def _fsdp(state: RunState) -> bool:
    return getattr(state.options, "distributed", "ddp") == "fsdp"


def _with_model(state: RunState, model: nn.Module, fn: Any) -> Any:
    """``fn(model)``; under FSDP through the sharded root's forward (every rank must call it)."""
    if _fsdp(state) and state.wrapped is not None and model is state.model:
        return state.wrapped(_call=fn)
    return fn(model)


def _memory_bytes(device: torch.device) -> int:
    """Peak memory so far: allocated tensors on CUDA, the process's peak RSS elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except ImportError:  # pragma: no cover - windows
        return 0


def peak_memory_report(options: Any, backend: str, model_config: Any, world: int, device: torch.device
                       ) -> dict[str, Any] | None:
    """On CUDA: the memory gate's prediction for this run next to the measured ``max_memory_allocated``
    (``None`` elsewhere: there is no allocator peak to compare with)."""
    if device.type != "cuda":
        return None
    from llmtune.memory import ModelSpec, estimate_training
    from llmtune.trainers._memory_gate import training_arguments

    measured = int(torch.cuda.max_memory_allocated(device))
    out: dict[str, Any] = {"measured_peak_bytes": measured, "device": torch.cuda.get_device_name(device)}
    try:
        config = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
        kw, notes = training_arguments(options, backend)
        est = estimate_training(ModelSpec.from_hf_config(config), gpus=world, **kw)
    except (LlmtuneError, TypeError, ValueError, KeyError) as exc:
        return {**out, "predicted_peak_bytes": None, "why_no_prediction": f"{type(exc).__name__}: {exc}"}
    predicted = int(est.peak_tensor_bytes)
    return {**out, "predicted_peak_bytes": predicted, "predicted_device_bytes": int(est.device_bytes),
            "measured_over_predicted": measured / predicted if predicted else None, "notes": notes}


def accelerator(mixed_precision: str) -> Any:
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
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def resolve_precision(option: str) -> str:
    if option == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if option == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision='fp16' needs a CUDA GPU (use 'bf16' or 'fp32' on CPU)")
    return option


# ====================================================================== entry point
def run(trainer: Any, options: Any, model: Any, data: Any, *, eval_data: Any, tokenizer: Any, output_dir: Path,
        resume: Any, callbacks: list[Any], overwrite: bool = False, allow_changes: tuple[str, ...] = ()
        ) -> TrainResult:
    """One training run of ``trainer`` (a `RecipeTrainer`) with ``options``; see the module doc."""
    from llmtune.core.atomic import translating_disk_full
    from llmtune.trainers._threads import choose_threads, resumed_threads, thread_scope

    threads, why = choose_threads(options.num_threads, cuda=torch.cuda.is_available())
    if resume and options.num_threads == "auto" and not overwrite:
        threads, why = resumed_threads(output_dir, threads, why)
    backend = trainer.make_backend()
    try:
        # out of space anywhere in the run (log, config, result): one line naming the output directory
        with thread_scope(threads), contextlib.ExitStack() as held, translating_disk_full(output_dir):
            state = setup(trainer, options, backend, model, data, eval_data=eval_data, tokenizer=tokenizer,
                          output_dir=output_dir, resume=resume, callbacks=callbacks, threads=(threads, why),
                          overwrite=overwrite, allow_changes=allow_changes, held=held)
            train(state)
            return finish(state)
    finally:
        backend.close()


# ====================================================================== setup
def setup(trainer: Any, options: Any, backend: TrainerBackend, model: Any, data: Any, *, eval_data: Any,
          tokenizer: Any, output_dir: Path, resume: Any, callbacks: list[Any], threads: tuple[int, str],
          overwrite: bool = False, allow_changes: tuple[str, ...] = (),
          held: contextlib.ExitStack | None = None) -> RunState:
    """Everything before the first step: processes, model, data, method, optimizer, resumed state.

    The output directory's lock (`llmtune.core.lock`, in ``state.lock``) is released when ``held`` closes."""
    from accelerate.utils import set_seed

    from llmtune.trainers.methods import get_method
    from llmtune.trainers.objectives import get_objective

    precision = resolve_precision(options.precision)
    acc = accelerator({"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"))
    ctx = BackendContext(options=options, device=acc.device, precision=precision, method=get_method(options.method),
                         objective=trainer.objective, seed=options.seed)
    state = RunState(options=options, objective=get_objective(trainer.objective), backend=backend, ctx=ctx, acc=acc,
                     out=output_dir, callbacks=CallbackList([JsonlLogger(output_dir / "log.jsonl"), VllmCheck(), *callbacks]),
                     num_threads=threads[0], threads_reason=threads[1], allow_changes=tuple(allow_changes))
    # the output directory first: a refused directory costs no model load
    _claim(state, trainer, model, data, resume, overwrite, held)
    set_seed(options.seed)
    base, state.tokenizer = backend.load(model, tokenizer, ctx)
    _setup_data(state, data, eval_data)
    _read_resumed(state)
    state.objective.setup(base, state)
    if "before" not in state.evals:
        state.evals["before"] = evaluate(state, base, "before")
    _setup_method(state, base)
    _setup_optimization(state)
    _write_config(state, trainer)
    state.rng = ckpt.rng_state()
    state.callbacks.on_train_start(state)
    state.started = True
    if state.evals.get("before") and state.resume_from is None:
        state.callbacks.on_evaluate(state, "before", state.evals["before"])
    return state


def model_identity(model: Any) -> str:
    """What names the base model in the run fingerprint: a local directory by its config and the *contents* of
    its weight files (a moved project still resumes, a changed model does not; each file is hashed once, then
    cached by size and mtime: `llmtune.core.filecache`), a local file (GGUF) by its contents, a hub id as is, a
    config by its content, a module by its size."""
    import hashlib
    import os

    from llmtune.core.filecache import content_sha256

    if isinstance(model, (str, os.PathLike)):
        local = Path(model).expanduser()
        if local.is_file():  # a GGUF file: its contents
            return f"file:{local.name}:{content_sha256(local)[:16]}"
        if not (local / "config.json").is_file():
            return str(model)
        h = hashlib.sha256((local / "config.json").read_bytes())
        for f in sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")):
            h.update(f"{f.name}:{content_sha256(f)}".encode())
        return f"local:{h.hexdigest()[:16]}"
    if isinstance(model, nn.Module):
        return f"{type(model).__name__}({sum(p.numel() for p in model.parameters())} parameters)"
    to_dict = getattr(model, "to_dict", None)
    blob = json.dumps(to_dict() if callable(to_dict) else model, sort_keys=True, default=str)
    return f"config:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _claim(state: RunState, trainer: Any, model: Any, data: Any, resume: Any, overwrite: bool,
           held: contextlib.ExitStack | None) -> None:
    """Lock ``state.out`` and claim it for this run (`_checkpoint.claim_output_dir`); find the checkpoint to resume."""
    from llmtune.core.lock import lock_output_dir

    config = {k: v for k, v in state.options.to_dict().items() if k not in NOT_RUN_IDENTITY}
    from llmtune.data.sources import as_spec

    spec = as_spec(data, getattr(state.options, "seed", 0))
    if spec is not None:  # the sources, their weights and the seed that mixes them, recorded in run.json
        config["data_sources"] = spec.to_dict()
    identity = broadcast_from_main(state, model_identity(model) if state.is_main_process else None)
    state.run_fingerprint = ckpt.Fingerprint(
        config={"trainer": f"{trainer.name}/{trainer.backend}", "model": identity, **config},
        data=state.objective.data_digest(data))
    outcome: dict[str, Any] = {"events": []}
    error: BaseException | None = None
    if state.is_main_process:
        try:
            state.lock = lock_output_dir(state.out)  # before anything is written: one run per directory
            if held is not None:
                held.callback(state.lock.release)
            claimed = ckpt.claim_output_dir(state.out, state.run_fingerprint, overwrite=overwrite,
                                            resume=resume not in (False, None), allow_changes=state.allow_changes)
            taken = [ckpt.CheckpointEvent("lock_taken_over", str(state.lock.path), f"a stale lock of "
                                          f"{state.lock.taken_over}")] if state.lock.taken_over else []
            outcome["events"] = [e.to_dict() for e in taken + claimed.events]
        except Exception as exc:  # every process must learn it, or the others wait at the next barrier forever
            error = exc
            outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome = broadcast_from_main(state, outcome)
    if error is not None:
        raise error
    if "error" in outcome:
        raise _same_error(outcome["error"], outcome["message"])
    state.checkpoint_events += [ckpt.CheckpointEvent(**e) for e in outcome["events"]]
    state.resume_from, skipped = ckpt.resolve_resume(resume, state.out)
    state.checkpoint_events += skipped


def broadcast_from_main(state: RunState, obj: Any) -> Any:
    """``obj`` of the main process, on every process (pickled through torch.distributed; one process: as is)."""
    import torch.distributed as dist

    if state.world == 1 or not dist.is_available() or not dist.is_initialized():
        return obj
    box = [obj if state.is_main_process else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _same_error(name: str, message: str) -> LlmtuneError:
    """The main process's error, re-created on another process (an llmtune error class by name, else
    `OutputDirError` naming what the main process raised)."""
    from llmtune.core import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, LlmtuneError):
        return cls(message)
    return OutputDirError(f"output_dir: the main process could not claim it: {name}: {message}")


def _setup_data(state: RunState, data: Any, eval_data: Any) -> None:
    opts, world = state.options, state.world
    state.data = state.objective.train_data(data, state.tokenizer, opts)
    if eval_data is not None:
        state.eval = state.objective.eval_data(eval_data, state.tokenizer, opts)
    state.global_batch = opts.batch_size * opts.grad_accum * world
    n = state.data.num_examples
    if n is not None:
        state.steps_per_epoch = n // state.global_batch
        if state.steps_per_epoch == 0:
            raise ConfigError(f"data: {n} examples are fewer than one global batch (batch_size {opts.batch_size} x "
                              f"grad_accum {opts.grad_accum} x {world} processes = {state.global_batch}); lower them")
    if opts.max_steps is not None:
        state.total_steps = opts.max_steps
    else:
        assert state.steps_per_epoch is not None
        state.total_steps = opts.epochs * state.steps_per_epoch
    state.fingerprint = state.data.fingerprint()


def _read_resumed(state: RunState) -> None:
    """Check that the checkpoint to resume from belongs to this run; take its history and evaluations."""
    path = state.resume_from
    if path is None:
        return
    saved = ckpt.check_resumable(path, state.run_fingerprint, state.allow_changes)
    if saved.get("fingerprint") != state.fingerprint and "data" not in state.allow_changes:
        raise OutputDirError(f"cannot resume from {path}: the tokenized training data differ from that run's "
                             "(a changed tokenizer?); allow it with --allow-change data")
    if saved.get("world_size") != state.world or saved.get("global_batch") != state.global_batch:
        raise ConfigError(f"cannot resume from {path}: it ran with {saved.get('world_size')} processes and global "
                          f"batch {saved.get('global_batch')}, this run has {state.world} and {state.global_batch}")
    state.resumed = saved
    state.evals = dict(saved.get("eval", {}))
    state.history = list(saved.get("history", []))
    state.step = int(saved["step"])
    state.last_good = path


def _setup_method(state: RunState, base: nn.Module) -> None:
    state.backend.prepare(base, state.ctx)
    state.model = state.backend.apply_method(base, state.ctx.method, state.ctx)
    if state.resume_from is not None:
        state.backend.load_weights(state.model, state.resume_from / state.ctx.method.output_name, state.ctx)
    state.trainable = [p for p in state.model.parameters() if p.requires_grad]
    if not state.trainable:
        raise LlmtuneError(f"method {state.options.method!r} left no trainable parameters (check targets)")


def _setup_optimization(state: RunState) -> None:
    from llmtune.trainers._optim import build_optimizer, build_scheduler, loraplus_groups

    opts = state.options
    root = _LossModule(state.model, state)
    if _fsdp(state):
        from llmtune.trainers import _fsdp as fsdp

        if state.world < 2:
            raise ConfigError("distributed='fsdp' shards over processes: launch 2 or more (torchrun / accelerate "
                              "launch), or use distributed='ddp' in one process")
        fsdp.shard(root, state.model)   # the parameters become this rank's shards (DTensors)
        state.trainable = [p for p in state.model.parameters() if p.requires_grad]
    params: list[Any] = state.trainable
    if getattr(opts, "loraplus_ratio", None) is not None:  # LoRA+: B learns loraplus_ratio times faster than A
        params = loraplus_groups(state.model, lr=opts.lr, ratio=opts.loraplus_ratio, weight_decay=opts.weight_decay)
    optimizer = build_optimizer(opts.optimizer, params, lr=opts.lr, weight_decay=opts.weight_decay)
    warmup = round(opts.warmup * state.total_steps) if opts.warmup < 1 else int(opts.warmup)
    state.scheduler = build_scheduler(opts.scheduler, optimizer, warmup, state.total_steps)
    if _fsdp(state):
        state.wrapped, state.optimizer = root, optimizer
    else:
        state.wrapped, state.optimizer = state.acc.prepare(root, optimizer)
    if state.resume_from is not None:
        _load_train_state(state, state.resume_from)
        ckpt.load_rng(state.resume_from, state.acc.process_index)


def _write_config(state: RunState, trainer: Any) -> None:
    if state.is_main_process:
        info = {"options": state.options.to_dict(), "trainer": trainer.name, "objective": trainer.objective,
                "backend": trainer.backend, "num_threads": state.num_threads,
                "num_threads_reason": state.threads_reason, **state.run_info}
        (state.out / "config.json").write_text(json.dumps(info, indent=1) + "\n")


# ====================================================================== train
def train(state: RunState) -> None:
    """Steps until ``total_steps``, a guard stop, or Ctrl-C (which saves a checkpoint, then re-raises)."""
    state.wrapped.train()
    with state.signals.installed():
        try:
            while state.step < state.total_steps and state.early_stopped is None:
                record = train_step(state)
                if record is None:
                    return
                _after_step(state, record)
        except (KeyboardInterrupt, _StopRequested):
            _interrupted(state)


def train_step(state: RunState) -> dict[str, Any] | None:
    """One optimizer step; returns its log record, or None when the guard stopped the run."""
    assert state.data is not None
    t0 = time.perf_counter()
    examples = state.data.step_examples(state.step, state.global_batch)
    loss, tokens = _forward_backward(state, examples)
    reason = _guard(state, loss)
    grad_norm = None
    if reason is None and state.options.max_grad_norm > 0:
        if _fsdp(state):
            from llmtune.trainers._fsdp import clip_grad_norm

            grad_norm = clip_grad_norm(state.trainable, state.options.max_grad_norm)
        else:
            grad_norm = float(state.acc.clip_grad_norm_(state.trainable, state.options.max_grad_norm))
        if not math.isfinite(grad_norm) and state.ctx.precision != "fp16":
            reason = f"non-finite gradient norm ({grad_norm}) at step {state.step + 1}"
    if reason is not None:
        _stop(state, reason)
        return None
    _confirm_pending(state)
    lr = float(state.scheduler.get_last_lr()[0])
    with state.signals.critical_section():  # a second Ctrl-C waits until the step is counted and recorded
        _optimizer_step(state)
        dt = time.perf_counter() - t0
        record = {"step": state.step, "epoch": state.step / state.steps_per_epoch if state.steps_per_epoch else None,
                  "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                  "tokens_per_s": tokens / dt if dt > 0 else None, "memory_bytes": _memory_bytes(state.acc.device),
                  "time_s": time.perf_counter() - state.t_start, "num_threads": state.num_threads,
                  **_objective_metrics(state)}
        state.history.append(record)
    return record


def _objective_metrics(state: RunState) -> dict[str, float]:
    """The objective's statistics of this step over the whole global batch (weighted sums added over processes)."""
    weight, sums = state.objective.pop_metric_sums()
    if state.world > 1 and sums:  # every process ran the same objective on its share: the same keys
        keys = sorted(sums)
        t = torch.tensor([weight, *(sums[k] for k in keys)], dtype=torch.float64, device=state.acc.device)
        t = state.acc.reduce(t, reduction="sum")
        weight, sums = float(t[0]), dict(zip(keys, t[1:].tolist()))
    return {k: v / weight for k, v in sums.items()} if weight else {}


def _forward_backward(state: RunState, examples: list[Any]) -> tuple[float, int]:
    """Forward + backward over this process's micro-batches; (global mean loss, tokens of all processes)."""
    acc, opts, world = state.acc, state.options, state.world
    rank = acc.process_index
    pad_id = state.tokenizer.pad_token_id
    global_tokens = max(sum(state.objective.scored_tokens(ex) for ex in examples), 1)
    local_sum = torch.zeros((), device=acc.device, dtype=torch.float32)
    local_tok = 0
    for j in range(opts.grad_accum):
        lo = (j * world + rank) * opts.batch_size
        batch = state.objective.collate(examples[lo:lo + opts.batch_size], pad_id)
        batch = {key: v.to(acc.device) for key, v in batch.items()}
        local_tok += int(batch["attention_mask"].sum())
        last = j == opts.grad_accum - 1 or _fsdp(state)   # FSDP: every micro-batch reduce-scatters
        sync = contextlib.nullcontext() if last else acc.no_sync(state.wrapped)
        with sync:
            loss_sum = state.wrapped(**batch)
            # DDP averages gradients over processes: scale so the result is sum / global tokens
            acc.backward(loss_sum * (world / global_tokens))
        local_sum += loss_sum.detach().float()
    total = acc.reduce(local_sum, reduction="sum") if world > 1 else local_sum
    return float(total) / global_tokens, local_tok * world


def _guard(state: RunState, loss: float) -> str | None:
    """Why this step's loss must stop the run (NaN/inf, or far above its recent median), or None."""
    n = state.step + 1
    if not math.isfinite(loss):
        return f"non-finite loss ({loss}) at step {n}"
    factor = state.options.divergence_factor
    recent = [h["loss"] for h in state.history[-DIVERGENCE_WINDOW:] if "loss" in h]
    if factor and recent:
        median = statistics.median(recent)
        if loss > factor * max(median, 1.0):
            return (f"divergence: loss {loss:.4g} at step {n} is more than {factor:g}x its recent median "
                    f"{median:.4g}")
    return None


def _optimizer_step(state: RunState) -> None:
    """Optimizer and scheduler step, the step counter and the RNG snapshot (inside a critical section)."""
    state.optimizer.step()
    if not getattr(state.optimizer, "step_was_skipped", False):
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.rng = ckpt.rng_state()


def _after_step(state: RunState, record: dict[str, Any]) -> None:
    opts, step = state.options, state.step
    if opts.eval_every and step % opts.eval_every == 0 and step < state.total_steps:
        record["eval"] = evaluate(state, state.acc.unwrap_model(state.wrapped).model, f"step-{step:06d}")
        state.wrapped.train()
        _early_stopping(state)
    if opts.save_every and step % opts.save_every == 0:
        with state.signals.critical_section():
            state.pending = save_checkpoint(state)
        _prune(state, extra=1)
    state.callbacks.on_step_end(state, record)
    if _stop_everywhere(state):
        raise _StopRequested


def _early_stopping(state: RunState) -> None:
    """Stop (normally) after ``early_stopping_patience`` periodic evaluations without a new best validation loss."""
    patience = state.options.early_stopping_patience
    if not patience:
        return
    seen = [state.evals.get("before", {}).get("loss")]
    seen += [h["eval"].get("loss") for h in state.history if isinstance(h.get("eval"), dict)]
    losses = [x for x in seen if x is not None]
    if len(losses) > patience and min(losses[-patience:]) >= min(losses[:-patience]):
        state.early_stopped = (f"validation loss has not improved for {patience} evaluations "
                               f"(best {min(losses):.4g}) at step {state.step}")


def _stop_everywhere(state: RunState) -> bool:
    """True on every process when any process saw Ctrl-C (so they all stop at the same step)."""
    if state.world == 1:
        return state.signals.requested
    flag = torch.tensor([1.0 if state.signals.requested else 0.0], device=state.acc.device)
    return bool(state.acc.reduce(flag, reduction="sum").item() > 0)


def _confirm_pending(state: RunState) -> None:
    """The step after the newest checkpoint was fine: that checkpoint is good."""
    if state.pending is not None:
        state.last_good, state.pending = state.pending, None
        _prune(state)


def _prune(state: RunState, extra: int = 0) -> None:
    """Keep ``keep_checkpoints`` good checkpoints (+ the unconfirmed newest one); never the newest."""
    keep = state.options.keep_checkpoints
    if state.is_main_process and keep:
        ckpt.prune(state.out, keep + extra, current=state.pending or state.last_good)
    state.acc.wait_for_everyone()


def _stop(state: RunState, reason: str) -> None:
    """The guard fired: drop the gradients and the unconfirmed checkpoint (the step after it was bad)."""
    state.optimizer.zero_grad(set_to_none=True)
    state.stopped = reason
    if state.pending is not None:
        if state.is_main_process:  # renamed away first: a crash never leaves it half-deleted under its name
            trash = state.pending.parent / f".trash-{state.pending.name}"
            shutil.rmtree(trash, ignore_errors=True)
            state.pending.rename(trash)
            shutil.rmtree(trash)
        state.pending = None
    state.acc.wait_for_everyone()
    state.callbacks.on_stop(state, reason, state.last_good)


def _interrupted(state: RunState) -> None:
    """Ctrl-C: save the state of the last step boundary (RNG included), then re-raise KeyboardInterrupt."""
    state.signals.critical += 1  # no further Ctrl-C while saving; never released: the run ends here
    state.optimizer.zero_grad(set_to_none=True)
    if state.rng is not None:
        ckpt.set_rng_state(state.rng)  # a partial step may have drawn from the RNGs
    path = save_checkpoint(state)
    state.callbacks.on_interrupt(state, path)
    what = "terminated (SIGTERM)" if state.signals.terminated else "interrupted"
    raise state.signals.interrupt(f"{what} after step {state.step}; checkpoint {path}") from None


# ====================================================================== evaluation
def evaluate(state: RunState, model: nn.Module, tag: str) -> dict[str, float]:
    """Validation loss and perplexity, and generation metrics where the objective has prompts."""
    ev = state.eval
    if ev is None or not (ev.examples or ev.prompts):
        return {}
    rng = ckpt.rng_state()
    scores: dict[str, float] = {}
    if ev.prompts:
        scores.update(_generation_scores(state, model, ev, tag))
    if ev.examples:
        loss = validation_loss(state, model, ev.examples)
        scores.update({"loss": loss, "perplexity": math.exp(min(loss, 700.0))})
    ckpt.set_rng_state(rng)
    if state.started:
        state.callbacks.on_evaluate(state, tag, scores)
    return scores


@torch.no_grad()
def validation_loss(state: RunState, model: nn.Module, examples: list[Any]) -> float:
    """Token-mean loss of ``examples`` (each process scores its share; the sums are all-reduced)."""
    was_training = model.training
    model.eval()
    # FSDP: a forward is collective, so every rank scores every example (no reduction needed)
    every = _fsdp(state) and model is state.model
    mine = examples if every else examples[state.acc.process_index::state.world]
    total = torch.zeros(2, device=state.acc.device, dtype=torch.float64)
    bs = state.options.eval_batch_size
    try:
        for start in range(0, len(mine), bs):
            part = mine[start:start + bs]
            batch = state.objective.collate(part, state.tokenizer.pad_token_id)
            batch = {k: v.to(state.acc.device) for k, v in batch.items()}
            loss = _with_model(state, model, lambda m, b=batch: state.objective.loss(state.backend, m, b, state.ctx))
            total[0] += loss.double()
            total[1] += sum(state.objective.scored_tokens(ex) for ex in part)
    finally:
        model.train(was_training)
    if state.world > 1 and not every:
        total = state.acc.reduce(total, reduction="sum")
    return float(total[0] / total[1].clamp(min=1))


def _generation_scores(state: RunState, model: nn.Module, ev: EvalData, tag: str) -> dict[str, float]:
    """Greedy answers on every process's share, gathered, scored (ROUGE/BLEU) on every process."""
    from llmtune.trainers._evaluate import generate, score

    world, rank = state.world, state.acc.process_index
    every = _fsdp(state) and model is state.model   # FSDP: every rank answers every prompt (greedy: the same)
    mine = list(range(len(ev.prompts))) if every else list(range(rank, len(ev.prompts), world))

    def answer(m: nn.Module) -> list[str]:
        with state.backend.generation(m) as target:
            return list(generate(target, state.tokenizer, [ev.prompts[i] for i in mine],
                                 max_new_tokens=state.options.max_new_tokens,
                                 batch_size=state.options.eval_batch_size))

    answers = _with_model(state, model, answer)
    if world > 1 and not every:
        from accelerate.utils import gather_object

        pairs = gather_object([list(zip(mine, answers))])
        by_index = {i: a for part in pairs for i, a in part}
    else:
        by_index = dict(zip(mine, answers))
    predictions = [by_index[i] for i in range(len(ev.prompts))]
    if state.is_main_process:
        with open(state.out / f"eval-{tag}.jsonl", "w") as fh:
            for p, r in zip(predictions, ev.references):
                fh.write(json.dumps({"prediction": p, "reference": r}) + "\n")
    return score(predictions, ev.references)


# ====================================================================== checkpoints
def _gathered(state: RunState, optimizer: bool) -> tuple[Any, Any]:
    """FSDP: the full model state dict and (``optimizer``) optimizer state on rank 0; (None, None) otherwise.
    Collective: every rank calls it."""
    if not _fsdp(state) or state.wrapped is None:
        return None, None
    from llmtune.trainers import _fsdp as fsdp

    model_sd = fsdp.full_model_state(state.wrapped)
    return model_sd, fsdp.full_optimizer_state(state.wrapped, state.optimizer) if optimizer else None


def _savable(state: RunState, model: nn.Module, model_sd: Any) -> Any:
    """What ``backend.save`` gets: the model, or under FSDP the model saving the gathered state dict."""
    if model_sd is None:
        return model
    from llmtune.trainers._fsdp import WithStateDict

    return WithStateDict(model, model_sd)


def _write_train_state(state: RunState, directory: Path, optimizer_sd: Any = None) -> None:
    """Optimizer and scheduler state of the run into a checkpoint directory (main process; no pickle)."""
    opt = state.optimizer.optimizer if hasattr(state.optimizer, "optimizer") else state.optimizer
    ckpt.save_state(directory, "optimizer", optimizer_sd if optimizer_sd is not None else opt.state_dict())
    ckpt.save_state(directory, "scheduler", state.scheduler.state_dict())


def _load_train_state(state: RunState, directory: Path) -> None:
    opt = state.optimizer.optimizer if hasattr(state.optimizer, "optimizer") else state.optimizer
    saved = ckpt.load_state(directory, "optimizer")
    if _fsdp(state):
        from llmtune.trainers._fsdp import load_optimizer_state

        load_optimizer_state(state.wrapped, opt, saved)
    else:
        opt.load_state_dict(saved)
    state.scheduler.load_state_dict(ckpt.load_state(directory, "scheduler"))


@contextlib.contextmanager
def _writing(final: Path) -> Iterator[None]:
    """Writing ``final``'s temporary directory: a failure removes it (freeing the space); out of space is a
    `DiskFullError` naming ``final``."""
    from llmtune.core.atomic import translating_disk_full

    try:
        with translating_disk_full(final):
            yield
    except BaseException:
        ckpt.abort(final)
        raise


def save_checkpoint(state: RunState) -> Path:
    """Write checkpoint ``state.step`` atomically (every process adds its RNG state)."""
    acc = state.acc
    final = ckpt.step_dir(state.out, state.step)
    if acc.is_main_process:
        ckpt.begin(final)
    acc.wait_for_everyone()
    tmp = ckpt.tmp_dir_for(final)
    with _writing(final):
        ckpt.save_rng(tmp, acc.process_index)
        model_sd, optimizer_sd = _gathered(state, optimizer=True)
        if acc.is_main_process:
            model = acc.unwrap_model(state.wrapped).model
            state.backend.save(_savable(state, model, model_sd), None, tmp / state.ctx.method.output_name, state.ctx)
            _write_train_state(state, tmp, optimizer_sd)
    acc.wait_for_everyone()
    if acc.is_main_process:
        info = {**state.run_info, "step": state.step, "history": state.history, "eval": state.evals}
        with _writing(final):
            ckpt.commit(final, jsonable(info))
    acc.wait_for_everyone()
    state.callbacks.on_checkpoint(state, final)
    return final


def _save_final(state: RunState, model: nn.Module, final: Path) -> None:
    """Atomically write what the method trained, and the tokenizer, to ``final``."""
    model_sd, _ = _gathered(state, optimizer=False)
    if state.is_main_process:
        tmp = ckpt.begin(final)
        with _writing(final):
            state.backend.save(_savable(state, model, model_sd), state.tokenizer, tmp, state.ctx)
            ckpt.commit(final)
    state.acc.wait_for_everyone()


# ====================================================================== finish
def finish(state: RunState) -> TrainResult:
    """Save the result (unless the guard stopped the run), evaluate "after", write result.json."""
    model = state.acc.unwrap_model(state.wrapped).model
    method = state.ctx.method
    if state.stopped is not None:
        result_dir = (state.last_good / method.output_name) if state.last_good is not None else None
    else:
        _confirm_pending(state)  # the run ended normally: its newest checkpoint is the last one, prune to keep
        result_dir = state.out / method.output_name
        _save_final(state, model, result_dir)
        state.evals["after"] = evaluate(state, model, "after")
    evals = state.evals if state.evals.get("before") else {}
    extra = {"steps": state.step, "total_steps": state.total_steps, "world_size": state.world,
             "precision": state.ctx.precision, "method": state.options.method, "early_stopped": state.early_stopped,
             "checkpoint_events": [e.to_dict() for e in state.checkpoint_events],
             "trainable_parameters": sum(p.numel() for p in state.trainable), "num_threads": state.num_threads,
             "seconds": time.perf_counter() - state.t_start}
    peak = peak_memory_report(state.options, getattr(state.backend, "name", "peft") or "peft",
                              getattr(model, "config", None) or {}, state.world, state.acc.device)
    if peak is not None:
        extra["peak_memory"] = peak
    result = TrainResult(adapter_dir=result_dir if method.adapter else None, history=state.history, eval=evals,
                         output_dir=state.out, stopped_early=state.stopped, extra=extra, model_dir=result_dir)
    if state.is_main_process:
        summary = {"adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
                   "model_dir": str(result_dir) if result_dir else None, "eval": evals,
                   "stopped_early": state.stopped, **extra}
        (state.out / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
    state.acc.wait_for_everyone()
    state.callbacks.on_train_end(state, result)
    return result
