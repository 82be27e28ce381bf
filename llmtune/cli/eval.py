"""`llmtune eval`: score a predictions file against reference files (ROUGE or BLEU), or run a benchmark task.

Two modes:

* ``llmtune eval --metric rouge --predictions P --references R``: metric mode, described below;
* ``llmtune eval --task hellaswag --data hellaswag_val.jsonl --model DIR [--adapter A]``: task mode, runs
  `llmtune.evaluate` (``--backend lm-eval`` runs lm-evaluation-harness instead); ``--output DIR`` writes
  per-item JSONL and ``results.json``; ``--option key=value`` passes task options (e.g. ``limit=100``).

A flag of the other mode (``--output`` with ``--metric``, ``--metric`` with ``--task``) is an error, not ignored.

File formats (chosen by extension, or forced with ``--format``):

* plain text (any extension but ``.jsonl``/``.json``): one example per line (``\\n`` or ``\\r\\n``); a final
  newline does not add an empty example. Several ``--references`` files give several references per
  prediction (line i of each file), like sacrebleu's command line.
* JSONL (``.jsonl``/``.json``): one JSON value per line: a string, or an object whose ``--field`` (default
  ``text``) is the text. In a references file the value may also be a list of strings: several references
  for that prediction, as many as you like (they may vary). JSONL is the way to keep multi-line summaries
  (rougeLsum splits sentences on ``\\n``). Blank lines are skipped.

Options of the metric go through ``--option key=value`` (repeatable); values are parsed as JSON when they
can be (``true``, ``3``, ``0.5``, ``["rouge1","rougeL"]``), comma-separated values become lists
(``rouge_types=rouge1,rougeL``, ``weights=0.5,0.5``), anything else is a string (``tokenize=intl``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llmtune.core.errors import ConfigError
from llmtune.core.paths import check_output_dir, read_text_file


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [_parse_value(part.strip()) for part in text.split(",") if part.strip()]
    return text


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` to a dict (values as in the module docstring); a malformed item is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r} is not key=value (e.g. --option tokenize=intl)")
        out[key.strip()] = _parse_value(value.strip())
    return out


def _is_jsonl(path: Path, fmt: str) -> bool:
    if fmt == "auto":
        return path.suffix.lower() in (".jsonl", ".json")
    return fmt == "jsonl"


def read_texts(path: Path, fmt: str, field: str, allow_lists: bool) -> list[Any]:
    """The examples of one file: strings (or, for references in JSONL, strings or lists of strings)."""
    raw = read_text_file(path)
    if not _is_jsonl(path, fmt):
        lines = raw.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return [line[:-1] if line.endswith("\r") else line for line in lines]
    out: list[Any] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.args[0]})") from None
        if isinstance(value, dict):
            if field not in value:
                raise ConfigError(f"{path}:{lineno}: no field {field!r} (fields: {', '.join(map(str, value))}); "
                                  f"choose one with --field")
            value = value[field]
        ok = isinstance(value, str) or (
            allow_lists and isinstance(value, list) and value and all(isinstance(v, str) for v in value))
        if not ok:
            want = "a string or a non-empty list of strings" if allow_lists else "a string"
            raise ConfigError(f"{path}:{lineno}: expected {want}, got {json.dumps(value)[:80]}")
        out.append(value)
    return out


def load_pairs(predictions: Path, references: list[Path], fmt: str = "auto", field: str = "text"
               ) -> tuple[list[str], list[list[str]]]:
    """Predictions and, per prediction, its references (from one or several files); counts must agree."""
    preds = read_texts(predictions, fmt, field, allow_lists=False)
    if not references:
        raise ConfigError("give at least one --references file")
    per_file = [read_texts(p, fmt, field, allow_lists=True) for p in references]
    for path, texts in zip(references, per_file):
        if len(texts) != len(preds):
            raise ConfigError(f"{predictions} has {len(preds)} examples but {path} has {len(texts)}: "
                              "each reference file needs one entry per prediction")
    refs: list[list[str]] = []
    for i in range(len(preds)):
        group: list[str] = []
        for texts in per_file:
            value = texts[i]
            group.extend(value if isinstance(value, list) else [value])
        refs.append(group)
    return preds, refs


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""

    @app.command("eval")
    def eval_command(
        metric: Annotated[Optional[str], typer.Option("--metric", "-m", help="rouge or bleu.")] = None,  # noqa: UP045
        predictions: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            "--predictions", "-p", help="Predictions file (text or JSONL).")] = None,
        references: Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
            "--references", "-r", help="Reference file(s): --references A B, or repeat the flag.")] = None,
        task: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
            "--task", "-t", help="Benchmark task(s) to run instead of a metric (see `llmtune backends --kind task`).")
        ] = None,
        data: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            "--data", help="Local data file of the task (default: its bundled made-up items).")] = None,
        model: Annotated[Optional[str], typer.Option(  # noqa: UP045
            "--model", help="Model directory or hub id (task mode; default: the adapter's base).")] = None,
        adapter: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            "--adapter", help="PEFT adapter directory applied on the model (task mode).")] = None,
        num_fewshot: Annotated[int, typer.Option("--num-fewshot", help="Few-shot examples per item.")] = 0,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per forward (task mode).")] = 8,
        output: Annotated[Optional[Path], typer.Option(  # noqa: UP045
            "--output", help="Directory for per-item JSONL and results.json (task mode).")] = None,
        more_references: Annotated[Optional[list[Path]], typer.Argument(  # noqa: UP045 (typer needs Optional)
            metavar="[FILE...]", show_default=False, help="More reference files (after --references A).")] = None,
        backend: Annotated[Optional[str], typer.Option(  # noqa: UP045
            "--backend", "-b", help="Implementation, e.g. numpy (default), rouge-score, sacrebleu, nltk.")] = None,
        option: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
            "--option", "-o", help="Metric option key=value (repeatable).")] = None,
        fmt: Annotated[str, typer.Option("--format", help="auto (by extension), text or jsonl.")] = "auto",
        field: Annotated[str, typer.Option("--field", help="JSONL object field holding the text.")] = "text",
        as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
        per_example: Annotated[bool, typer.Option("--per-example", help="Also output per-example values.")] = False,
    ) -> None:
        """Score predictions against references with ROUGE or BLEU, or run benchmark tasks on a model."""
        import llmtune

        _refuse_other_mode(bool(task), {
            "--metric": metric, "--predictions": predictions, "--references": references or more_references,
            "--format": fmt != "auto", "--field": field != "text"}, {
            "--data": data, "--model": model, "--adapter": adapter, "--output": output,
            "--num-fewshot": num_fewshot != 0, "--batch-size": batch_size != 8})
        if task:
            options = parse_options(list(option or []))
            results = _run_tasks(task, data=data, model=model, adapter=adapter, backend=backend,
                                 num_fewshot=num_fewshot, batch_size=batch_size, output=output, options=options)
            _render_tasks(results, as_json=as_json, per_example=per_example)
            return
        if metric is None or predictions is None:
            raise ConfigError("give --metric with --predictions and --references, or --task (with --model/--adapter)")
        if fmt not in ("auto", "text", "jsonl"):
            raise ConfigError(f"--format {fmt!r} is not one of auto, text, jsonl")
        preds, refs = load_pairs(predictions, [*(references or []), *(more_references or [])], fmt, field)
        options = parse_options(list(option or []))
        m = llmtune.get_metric(metric, backend=backend, **options)
        result = m.compute(preds, refs)
        per = {k: [float(x) for x in v] for k, v in result.per_example.items()} if per_example else None
        if as_json:
            payload: dict[str, Any] = {"metric": m.name, "backend": m.backend, "n": len(preds),
                                       "scores": result.scores, "signature": result.signature}
            if per is not None:
                payload["per_example"] = per
            typer.echo(json.dumps(payload))
            return
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        console = Console()
        table = Table(title=f"{m.name} ({m.backend}) on {len(preds)} examples")
        table.add_column("key")
        table.add_column("value", justify="right")
        for key, value in result.scores.items():
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
        console.print(table)
        console.print(f"signature: {escape(result.signature)}", highlight=False, soft_wrap=True)
        if per is not None:
            ex = Table(title="per example")
            ex.add_column("#", justify="right")
            for key in per:
                ex.add_column(key, justify="right")
            for i in range(len(preds)):
                ex.add_row(str(i), *(f"{per[k][i]:.4f}" for k in per))
            console.print(ex)


def _refuse_other_mode(task_mode: bool, metric_flags: dict[str, Any], task_flags: dict[str, Any]) -> None:
    """A flag of the other mode would be ignored silently (``--output`` in metric mode writes nothing): refuse it."""
    unused = metric_flags if task_mode else task_flags
    given = [flag for flag, value in unused.items() if value]
    if given:
        mode, other = ("task mode (--task)", "metric mode") if task_mode else ("metric mode (--metric)", "task mode")
        raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for {other}, not {mode}; "
                          f"drop {'it' if len(given) == 1 else 'them'}")


def _run_tasks(names: list[str], *, data: Path | None, model: str | None, adapter: Path | None, backend: str | None,
               num_fewshot: int, batch_size: int, output: Path | None, options: dict[str, Any]) -> dict[str, Any]:
    """`llmtune.evaluate` with the command line's options given to every task."""
    import llmtune

    if data is not None and len(names) != 1:
        raise ConfigError("--data names one file: give exactly one --task with it")
    if model is None and adapter is None:
        raise ConfigError("task mode needs --model (a directory or hub id) and/or --adapter")
    if output is not None:  # before a model loads; `evaluate` checks every task's files again
        check_output_dir(output, [data, options.get("fewshot_data")], what="--output")
    per_task = {**options, "num_fewshot": num_fewshot}
    if data is not None:
        per_task["data"] = str(data)
    return llmtune.evaluate(model, names, adapter=adapter, batch_size=batch_size, backend=backend,
                            task_options={n: per_task for n in names}, output_dir=output)


def _render_tasks(results: dict[str, Any], *, as_json: bool, per_example: bool) -> None:
    if as_json:
        for name, r in results.items():
            payload: dict[str, Any] = {"task": name, "backend": r.backend, "n": r.n, "metrics": r.metrics,
                                       "stderr": r.stderr, "config": r.config}
            if per_example:
                payload["per_item"] = r.per_item
            typer.echo(json.dumps(payload, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="llmtune eval")
    for col in ("task", "backend", "n", "metric", "value", "stderr"):
        table.add_column(col, justify="right" if col in ("n", "value", "stderr") else "left")
    for name, r in results.items():
        for key, value in r.metrics.items():
            se = r.stderr.get(key, float("nan"))
            table.add_row(name, r.backend, str(r.n), key, f"{value:.4f}", "" if se != se else f"± {se:.4f}")
    Console().print(table)
