"""`evaluate`: run several tasks on one model (a module, a local path, optionally an adapter) and save the outputs."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmtune.core.errors import ArgumentTypeError, ConfigError, UnknownOptionError, did_you_mean
from llmtune.core.interfaces import Task
from llmtune.core.paths import check_output_dir
from llmtune.core.results import TaskResult


def load_model(model: Any, tokenizer: Any = None, adapter: str | Path | None = None) -> tuple[Any, Any]:
    """``(module, tokenizer)``: load ``model`` when it is a path or hub id, then apply a PEFT ``adapter`` dir.

    ``model=None`` with an adapter loads the base model the adapter records (``base_model_name_or_path``).
    """
    if model is None:
        model = _adapter_base(adapter)
    if isinstance(model, (str, Path)):
        from llmtune.models.loading import load_model_and_tokenizer

        model, loaded_tok = load_model_and_tokenizer(str(model))
        tokenizer = tokenizer if tokenizer is not None else loaded_tok
    if adapter is not None:
        from peft import PeftModel

        adapter = Path(adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise ConfigError(f"{adapter} is not an adapter directory (no adapter_config.json)")
        if tokenizer is None and (adapter / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(adapter))
        model = PeftModel.from_pretrained(model, str(adapter))
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass tokenizer= with an nn.Module")
    model.eval()
    return model, tokenizer


def _adapter_base(adapter: str | Path | None) -> str:
    if adapter is None:
        raise ConfigError("give a model, an adapter, or both")
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter} is not an adapter directory (no adapter_config.json)")
    base = json.loads(path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"adapter {adapter} does not record its base model; pass the model")
    return str(base)


def _tasks(tasks: Any, backend: str | None, task_options: Mapping[str, Mapping[str, Any]]) -> list[Task]:
    """The `Task` objects of ``tasks``; every key of ``task_options`` must name one of the tasks given by name."""
    from llmtune.core.registry import get_task

    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ArgumentTypeError(f"tasks must be a task name, a Task, or a non-empty list of them; got {tasks!r}")
    names = [t for t in tasks if isinstance(t, str)]
    for key in task_options:
        if key not in names:
            hint = did_you_mean(str(key), names)
            raise UnknownOptionError(f"task_options names {key!r}, which is not among the tasks given by name "
                                     f"({', '.join(map(repr, names)) or 'none'}).{hint} Options of a Task object go to "
                                     "get_task(name, **options)", field=str(key))
    out = []
    for t in tasks:
        if isinstance(t, Task):
            out.append(t)
        elif isinstance(t, str):
            out.append(get_task(t, backend=backend, **dict(task_options.get(t, {}))))
        else:
            raise ConfigError(f"tasks must be names or Task objects, got {t!r}")
    for task in out:  # read every data file now: a bad row is reported before a model loads
        task.check_data()
    return out


def evaluate(
    model: Any,
    tasks: str | Task | Sequence[str | Task],
    *,
    tokenizer: Any = None,
    adapter: str | Path | None = None,
    batch_size: int = 8,
    backend: str | None = None,
    task_options: Mapping[str, Mapping[str, Any]] | None = None,
    output_dir: str | Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, TaskResult]:
    """Run ``tasks`` on ``model``; returns {task name: `TaskResult`}.

    ``model``: an ``nn.Module`` (with ``tokenizer``; a PEFT or quantized module works as is), or a local path /
    hub id loaded with `llmtune.models.loading`. ``adapter``: a PEFT adapter directory applied on top.
    ``tasks``: names (``get_task(name, backend=backend, **task_options[name])``) or `Task` objects.
    ``output_dir``: writes ``{task}.jsonl`` (one line per item) and ``results.json`` (metrics, stderr, config).
    ``progress(task, done, total)`` is called as items are scored.
    """
    chosen = _tasks(tasks, backend, task_options or {})
    out = check_output_dir(output_dir, _task_inputs(chosen), what="output_dir") if output_dir is not None else None
    was_training = bool(getattr(model, "training", False))
    module, tok = load_model(model, tokenizer, adapter)
    if was_training and module is model:
        module.train()  # a caller's module is given back in its own mode (the scorer evaluates in eval mode)
    results: dict[str, TaskResult] = {}
    for task in chosen:
        def tick(done: int, total: int, _name: str = task.name) -> None:
            if progress is not None:
                progress(_name, done, total)

        results[task.name] = task.evaluate(module, tok, batch_size=batch_size, progress=tick)
    if out is not None:
        write_results(results, out)
    return results


def _task_inputs(tasks: Sequence[Task]) -> list[str]:
    """The data files the tasks read (an output directory must not hold them)."""
    out = []
    for task in tasks:
        opts = getattr(task, "options", None)
        out += [str(p) for p in (getattr(opts, "data", None), getattr(opts, "fewshot_data", None)) if p]
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_results(results: Mapping[str, TaskResult], output_dir: str | Path) -> Path:
    """``{task}.jsonl`` per task and ``results.json``; returns the directory."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name, r in results.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in r.per_item:
                fh.write(json.dumps(_jsonable(row), ensure_ascii=False) + "\n")
        summary[name] = _jsonable({"metrics": r.metrics, "stderr": r.stderr, "n": r.n, "config": r.config})
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return out
