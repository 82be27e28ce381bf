"""Callbacks that run during and at the end of training: llmtune tasks (`TaskEvaluator`) and the vLLM check.

`TaskEvaluator` scores `llmtune.tasks` (e.g. ``kopitiam-mc``) on the model being trained, every ``every``
steps (``every=0``: at the held-out evaluation points, ``eval_every``) and after the last step, with the model
in eval mode and the RNG states restored afterwards (training continues exactly as without it). Each
evaluation is one ``log.jsonl`` line ``{"step", "event": "tasks", "final", "tasks": {name: {metrics, stderr,
n}}}``; ``result.extra["tasks"]`` (and ``result.json``) holds them all. After a resume, evaluations before the
checkpoint are not carried over.

`VllmCheck` (always attached by the loop) runs `llmtune.export.check_vllm` on the saved adapter: the findings
go to ``result.extra["vllm_check"]`` (``[]``: none; None: no adapter), ``result.json`` and, when there is any, a
``log.jsonl`` line ``{"step", "event": "vllm_check", "findings"}``.
It never fails a run: a finding is information, and an error of the check itself is recorded as such.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmtune.core.errors import ConfigError, LlmtuneError
from llmtune.trainers.callbacks import Callback


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task to run during training: a `Task` and its period in steps (0: the evaluator's default)."""

    task: Any
    every: int = 0


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be a whole number >= 0, not {value!r}")
    return value


def make_spec(item: Any) -> TaskSpec:
    """A `TaskSpec` from a task name, a `Task`, or a mapping ``{name, every, **task options}``."""
    from llmtune.core.interfaces import Task
    from llmtune.core.registry import get_task

    if isinstance(item, TaskSpec):
        return item
    if isinstance(item, Task):
        return TaskSpec(item)
    if isinstance(item, str):
        item = {"name": item}
    if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
        raise ConfigError(f"a task must be a name, a Task, or a mapping with 'name', not {item!r}")
    options = {k: v for k, v in item.items() if k not in ("name", "backend", "every")}
    every = _positive_int(item.get("every", 0), f"task {item['name']!r}: every")
    return TaskSpec(get_task(item["name"], backend=item.get("backend"), **options), every)


def summary(result: Any) -> dict[str, Any]:
    """What is logged of a `TaskResult`: metrics, standard errors, number of items."""
    return {"metrics": dict(result.metrics), "stderr": dict(result.stderr), "n": int(result.n)}


def _append_log(state: Any, record: Mapping[str, Any]) -> None:
    if state.is_main_process:
        with open(state.out / "log.jsonl", "a") as fh:
            fh.write(json.dumps(_finite(record)) + "\n")


def _finite(value: Any) -> Any:
    """NaN/inf become None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _update_result_json(state: Any, key: str, value: Any) -> None:
    path = state.out / "result.json"
    if state.is_main_process and path.is_file():
        data = json.loads(path.read_text())
        data[key] = _finite(value)
        path.write_text(json.dumps(data, indent=1) + "\n")


class TaskEvaluator(Callback):
    """Run ``tasks`` on the model being trained every ``every`` steps and after the last step.

    ``tasks``: names, `Task` objects or mappings ``{name, every, **task options}`` (a task's own ``every``
    overrides the evaluator's). ``every=0``: at the held-out evaluation points (the ``eval_every`` option).
    ``at_end``: also after the last step (the weights the saved adapter holds). ``batch_size``: scoring batch.
    """

    def __init__(self, tasks: Sequence[Any], *, every: int = 0, batch_size: int = 8, at_end: bool = True) -> None:
        self.specs = [make_spec(t) for t in ([tasks] if isinstance(tasks, (str, Mapping)) else tasks)]
        if not self.specs:
            raise ConfigError("TaskEvaluator needs at least one task")
        for spec in self.specs:  # a bad data row is reported now (and by --check), not after the training
            getattr(spec.task, "check_data", lambda: None)()
        self.every = _positive_int(every, "TaskEvaluator every")
        self.batch_size = _positive_int(batch_size, "TaskEvaluator batch_size") or 8
        self.at_end = at_end
        self.results: list[dict[str, Any]] = []

    def _due(self, spec: TaskSpec, state: Any, final: bool) -> bool:
        every = spec.every or self.every or int(getattr(state.options, "eval_every", 0) or 0)
        return (final and self.at_end) or bool(every and state.step % every == 0)

    def on_train_start(self, state: Any) -> None:
        self.results = []

    def on_step_end(self, state: Any, record: dict[str, Any]) -> None:
        final = state.step >= state.total_steps or state.early_stopped is not None
        due = [s for s in self.specs if self._due(s, state, final)]
        if not due:
            return
        scores = self.run(state, [s.task for s in due])
        entry = {"step": state.step, "event": "tasks", "final": final, "tasks": scores}
        self.results.append(entry)
        _append_log(state, entry)

    def run(self, state: Any, tasks: list[Any]) -> dict[str, dict[str, Any]]:
        """Score ``tasks`` on ``state.model`` in eval mode; the mode and the RNG states are restored."""
        from llmtune.trainers import _checkpoint as ckpt

        model = state.acc.unwrap_model(state.wrapped).model if state.wrapped is not None else state.model
        was_training = model.training
        rng = ckpt.rng_state()
        model.eval()
        try:
            with state.backend.generation(model) as target:
                return {t.name: summary(t.evaluate(target, state.tokenizer, batch_size=self.batch_size))
                        for t in tasks}
        finally:
            model.train(was_training)
            ckpt.set_rng_state(rng)

    def on_train_end(self, state: Any, result: Any) -> None:
        result.extra["tasks"] = list(self.results)
        _update_result_json(state, "tasks", self.results)


def vllm_findings(adapter_dir: Path | None) -> list[dict[str, str]] | None:
    """`check_vllm`'s findings as dicts (None without an adapter); an error of the check is one finding."""
    if adapter_dir is None:
        return None
    from llmtune.export.vllm import check_vllm

    try:
        return [dataclasses.asdict(f) for f in check_vllm(adapter_dir)]
    except (LlmtuneError, OSError, ValueError) as exc:
        return [{"kind": "check_failed", "severity": "error", "message": f"the vLLM check could not run: {exc}",
                 "fix": "run llmtune export --check vllm on the adapter"}]


class VllmCheck(Callback):
    """At the end of training, what vLLM would refuse in the saved adapter (see the module doc)."""

    def on_train_end(self, state: Any, result: Any) -> None:
        if result.stopped_early:
            return
        findings = vllm_findings(result.adapter_dir)
        result.extra["vllm_check"] = findings
        _update_result_json(state, "vllm_check", findings)
        if findings:  # a clean adapter adds no line: log.jsonl stays one line per step
            _append_log(state, {"step": state.step, "event": "vllm_check", "findings": findings})


def finding_line(finding: Mapping[str, str]) -> str:
    """One console line for a vLLM finding."""
    what = {"refused": "vLLM will refuse this adapter", "flag": "vLLM needs a setting for this adapter"}
    return (f"warning: {what.get(finding['severity'], 'vLLM check')} ({finding['kind']}): {finding['message']}; "
            f"{finding['fix']}")


def config_task_evaluators(value: Any, where: str) -> list[TaskEvaluator]:
    """The YAML ``eval_tasks`` key: a list of names or ``{name, every, batch_size, **task options}``."""
    items = [value] if isinstance(value, (str, Mapping)) else value
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: 'eval_tasks' must be a list of task names or mappings with 'name', "
                          f"not {value!r}")
    out = []
    for i, item in enumerate(items):
        spec = dict(item) if isinstance(item, Mapping) else item
        batch = spec.pop("batch_size", 8) if isinstance(spec, dict) else 8
        try:
            out.append(TaskEvaluator([spec], batch_size=_positive_int(batch, "batch_size") or 8))
        except LlmtuneError as exc:
            raise ConfigError(f"{where}: eval_tasks[{i}]: {exc}") from None
    return out
