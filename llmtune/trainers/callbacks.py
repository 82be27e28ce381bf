"""Callbacks: everything a run reports goes through them; the library itself prints nothing.

The loop calls every callback on every process (``state.is_main_process`` says which one is rank 0):

    on_train_start(state)                 after setup, before the first step
    on_step_end(state, record)            after each optimizer step (``record`` is its log.jsonl line)
    on_evaluate(state, tag, scores)       after each held-out evaluation ("before", "step-000010", "after")
    on_checkpoint(state, path)            after a checkpoint is committed
    on_stop(state, reason, last_good)     the NaN/divergence guard stopped the run
    on_interrupt(state, path)             Ctrl-C: the checkpoint was saved, the run stops
    on_train_end(state, result)           after the result is written

``state`` is the run's `RunState` (read it, do not change it); a callback may raise ``KeyboardInterrupt``
in ``on_step_end`` to stop the run as Ctrl-C would. `JsonlLogger` (``OUT/log.jsonl``) and `VllmCheck`
(`llmtune.trainers.callbacks_tasks`: the vLLM check of the saved adapter) are always attached;
the CLI adds `ProgressBar` and `ConsoleReporter`. `TensorBoardLogger`/`MLflowLogger`/`WandbLogger` are optional extras.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, state: Any) -> None: ...

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None: ...

    def on_evaluate(self, state: Any, tag: str, scores: dict[str, float]) -> None: ...

    def on_checkpoint(self, state: Any, path: Path) -> None: ...

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None: ...

    def on_interrupt(self, state: Any, path: Path) -> None: ...

    def on_train_end(self, state: Any, result: Any) -> None: ...


class CallbackList(Callback):
    """Calls every callback in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def on_train_start(self, state: Any) -> None:
        self._each("on_train_start", state)

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        self._each("on_step_end", state, record)

    def on_evaluate(self, state: Any, tag: str, scores: dict[str, float]) -> None:
        self._each("on_evaluate", state, tag, scores)

    def on_checkpoint(self, state: Any, path: Path) -> None:
        self._each("on_checkpoint", state, path)

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._each("on_stop", state, reason, last_good)

    def on_interrupt(self, state: Any, path: Path) -> None:
        self._each("on_interrupt", state, path)

    def on_train_end(self, state: Any, result: Any) -> None:
        self._each("on_train_end", state, result)


class JsonlLogger(Callback):
    """``OUT/log.jsonl``: one line per optimizer step and one per stop event (main process only).

    On resume the file is rewritten with the history up to the checkpoint, then the new steps follow.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_start(self, state: Any) -> None:
        if state.is_main_process:
            with open(self.path, "w") as fh:
                for rec in state.history:
                    fh.write(json.dumps(rec) + "\n")
                for event in state.checkpoint_events:  # damaged checkpoints skipped, crash leftovers, a run replaced
                    fh.write(json.dumps({"step": state.step, **event.to_dict()}) + "\n")

    def _write(self, state: Any, rec: dict[str, Any]) -> None:
        if state.is_main_process:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        self._write(state, record)

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._write(state, {"step": state.step + 1, "event": "stopped", "reason": reason,
                            "last_good_checkpoint": str(last_good) if last_good else None})

    def on_train_end(self, state: Any, result: Any) -> None:
        peak = result.extra.get("peak_memory")   # CUDA only: predicted vs measured peak
        if peak is not None:
            self._write(state, {"step": state.step, "event": "peak_memory", **peak})


class ProgressBar(Callback):
    """A rich progress bar on the main process: loss, tokens/s and memory, every ``every`` steps."""

    def __init__(self, every: int = 1) -> None:
        self.every = every
        self._bar: Any = None
        self._task: Any = None

    def on_train_start(self, state: Any) -> None:
        if not state.is_main_process:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                             TextColumn("{task.fields[info]}"), transient=False)
        self._task = self._bar.add_task("train", total=state.total_steps, completed=state.step, info="")
        self._bar.start()

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if self._bar is None or not (record["step"] % self.every == 0 or record["step"] == state.total_steps):
            return
        tps = record.get("tokens_per_s") or 0.0
        info = f"loss {record['loss']:.4f}  {tps:,.0f} tok/s  mem {record['memory_bytes'] / 2**20:,.0f} MiB"
        self._bar.update(self._task, completed=record["step"], info=info)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def on_interrupt(self, state: Any, path: Path) -> None:
        self._close()

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._close()

    def on_train_end(self, state: Any, result: Any) -> None:
        self._close()


class ConsoleReporter(Callback):
    """One line for the events a user must know about (interrupt, guard stop, each vLLM finding at the end),
    through ``echo``."""

    def __init__(self, echo: Callable[[str], None], *, interrupts: bool = True) -> None:
        self.echo = echo
        self.interrupts = interrupts

    def on_interrupt(self, state: Any, path: Path) -> None:
        if state.is_main_process and self.interrupts:
            self.echo(f"interrupted after step {state.step}: checkpoint saved to {path}; "
                      "resume with resume='auto' (CLI: --resume auto)")

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        if state.is_main_process:
            self.echo(f"stopped: {reason}; last good checkpoint: {last_good}")

    def on_train_end(self, state: Any, result: Any) -> None:
        from llmtune.trainers.callbacks_tasks import finding_line

        if state.is_main_process:
            for finding in result.extra.get("vllm_check") or []:   # `VllmCheck` ran before (the loop attaches it)
                self.echo(finding_line(finding))


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a step record (loss, lr, grad_norm, tokens_per_s, ...)."""
    keys = ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "memory_bytes", "epoch")
    return {k: float(record[k]) for k in keys if isinstance(record.get(k), (int, float))}


class TensorBoardLogger(Callback):
    """TensorBoard event files (``pip install 'llmtune[tensorboard]'``): ``train/<field>`` every step and
    ``eval/<metric>`` at every evaluation, in ``log_dir`` (default ``OUT/tensorboard``), main process only."""

    def __init__(self, log_dir: str | Path | None = None) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def on_train_start(self, state: Any) -> None:
        if not state.is_main_process:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            from llmtune.core.errors import MissingDependencyError

            raise MissingDependencyError("TensorBoardLogger needs tensorboard: pip install 'llmtune[tensorboard]'"
                                         ) from exc
        self._writer = SummaryWriter(log_dir=str(self.log_dir or state.out / "tensorboard"), purge_step=state.step + 1)

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if self._writer is not None:
            for key, value in _scalars(record).items():
                self._writer.add_scalar(f"train/{key}", value, record["step"])

    def on_evaluate(self, state: Any, tag: str, scores: dict[str, float]) -> None:
        if self._writer is not None:
            for key, value in scores.items():
                self._writer.add_scalar(f"eval/{key}", value, state.step)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._close()

    def on_interrupt(self, state: Any, path: Path) -> None:
        self._close()

    def on_train_end(self, state: Any, result: Any) -> None:
        self._close()


class MLflowLogger(Callback):
    """An MLflow run (``pip install 'llmtune[mlflow]'``): options as params, step fields and evaluation
    scores (``eval_<metric>``) as metrics. ``tracking_uri`` defaults to a local SQLite store, ``OUT/mlflow.db``; the
    run is ended FINISHED, KILLED (Ctrl-C) or FAILED (guard stop). ``run_id`` is set once it started."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "llmtune", run_name: str | None = None
                 ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: str | None = None
        self._client: Any = None

    def on_train_start(self, state: Any) -> None:
        if not state.is_main_process:
            return
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            from llmtune.core.errors import MissingDependencyError

            raise MissingDependencyError("MLflowLogger needs mlflow: pip install 'llmtune[mlflow]'") from exc
        # MLflow >= 3 keeps the file store in maintenance mode: a local SQLite store is its default
        uri = self.tracking_uri or f"sqlite:///{(state.out / 'mlflow.db').resolve()}"
        self.tracking_uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.experiment)
        run = self._client.create_run(exp_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        for key, value in state.options.to_dict().items():
            self._client.log_param(self.run_id, key, str(value)[:500])

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if self._client is not None:
            for key, value in _scalars(record).items():
                self._client.log_metric(self.run_id, key, value, step=record["step"])

    def on_evaluate(self, state: Any, tag: str, scores: dict[str, float]) -> None:
        if self._client is not None:
            for key, value in scores.items():
                self._client.log_metric(self.run_id, f"eval_{key}", float(value), step=state.step)

    def _end(self, status: str) -> None:
        if self._client is not None:
            self._client.set_terminated(self.run_id, status=status)
            self._client = None

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._end("FAILED")

    def on_interrupt(self, state: Any, path: Path) -> None:
        self._end("KILLED")

    def on_train_end(self, state: Any, result: Any) -> None:
        self._end("FINISHED")


class WandbLogger(Callback):
    """A Weights & Biases run (``pip install 'llmtune[wandb]'``): options as its config, ``train/<field>`` every step
    and ``eval/<metric>`` at every evaluation, files under ``dir`` (default ``OUT``, wandb adds ``wandb/``). The mode
    is wandb's own (``WANDB_MODE=offline`` writes only local files, for ``wandb sync`` later); nothing is printed.
    The run finishes with exit code 0, 255 (Ctrl-C) or 1 (guard stop). ``run_id`` and ``run_dir`` are set once it
    started."""

    def __init__(self, project: str = "llmtune", name: str | None = None, dir: str | Path | None = None,
                 mode: Literal["online", "offline", "disabled"] | None = None) -> None:
        self.project, self.name, self.dir, self.mode = project, name, dir, mode
        self.run_id: str | None = None
        self.run_dir: Path | None = None
        self._run: Any = None

    def on_train_start(self, state: Any) -> None:
        if not state.is_main_process:
            return
        try:
            import wandb
        except ImportError as exc:
            from llmtune.core.errors import MissingDependencyError

            raise MissingDependencyError("WandbLogger needs wandb: pip install 'llmtune[wandb]'") from exc
        directory = Path(self.dir or state.out)
        directory.mkdir(parents=True, exist_ok=True)
        config = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                  for k, v in state.options.to_dict().items()}
        self._run = wandb.init(project=self.project, name=self.name, dir=str(directory), config=config,
                               mode=self.mode, settings=wandb.Settings(silent=True, console="off"))
        self.run_id = self._run.id
        self.run_dir = Path(self._run.dir).parent

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.log({f"train/{k}": v for k, v in _scalars(record).items()}, step=record["step"])

    def on_evaluate(self, state: Any, tag: str, scores: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log({f"eval/{k}": float(v) for k, v in scores.items()}, step=state.step)

    def _finish(self, code: int) -> None:
        if self._run is not None:
            self._run.finish(exit_code=code)
            self._run = None

    def on_stop(self, state: Any, reason: str, last_good: Path | None) -> None:
        self._finish(1)

    def on_interrupt(self, state: Any, path: Path) -> None:
        self._finish(255)

    def on_train_end(self, state: Any, result: Any) -> None:
        self._finish(0)
