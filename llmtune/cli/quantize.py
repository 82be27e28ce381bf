"""`llmtune quantize MODEL_DIR --method gptq --bits 4 --group-size 128 --calibration FILE --out DIR`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer


@contextlib.contextmanager
def _progress_bar(label: str, enabled: bool) -> Iterator[Any]:
    """A rich bar fed by the library's ``progress(step, done, total)`` callback; None (no bar) when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[step]}"), TimeElapsedColumn(), transient=False)
    task = bar.add_task(label, total=None, step="")

    def progress(step: str, done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, step=step)

    with bar:
        yield progress


def register(app: typer.Typer) -> None:
    @app.command("quantize")
    def quantize(
        model_dir: Annotated[Path, typer.Argument(help="Local model directory (config.json, safetensors, tokenizer) or .gguf file.")],
        out: Annotated[Path, typer.Option("--out", help="Directory to write the quantized checkpoint to.")],
        method: str = typer.Option("gptq", "--method", help="Quantizer name: gptq, rtn, nf4, fp4, int8, ..."),
        backend: str = typer.Option(None, "--backend", help="Backend of the method (default: its default)."),
        calibration: Annotated[Path | None, typer.Option("--calibration", help="Text file for calibration (gptq).")] = None,
        bits: int = typer.Option(None, "--bits", help="Bits per weight (gptq/rtn: 2, 3, 4 or 8)."),
        group_size: int = typer.Option(None, "--group-size", help="Columns per scale/zero group; -1 = per row."),
        act_order: bool = typer.Option(None, "--act-order/--no-act-order", help="GPTQ act-order (desc_act)."),
        sym: bool = typer.Option(None, "--sym/--asym", help="Symmetric or asymmetric grid."),
        damp_percent: float = typer.Option(None, "--damp-percent", help="GPTQ Hessian damping (0..1)."),
        samples: int = typer.Option(128, "--samples", help="Calibration samples (random windows of the text)."),
        seq_len: int = typer.Option(512, "--seq-len", help="Tokens per calibration sample."),
        seed: int = typer.Option(0, "--seed", help="Seed for picking calibration windows."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON line."),
    ) -> None:
        """Quantize a local model directory and save it (GPTQ layout for gptq/rtn, safetensors for bnb)."""
        from rich.console import Console
        from rich.table import Table

        from llmtune.quantizers.directory import quantize_directory

        given = {"bits": bits, "group_size": group_size, "act_order": act_order, "sym": sym,
                 "damp_percent": damp_percent}
        options = {k: v for k, v in given.items() if v is not None}
        if quiet or as_json:  # a bar would mix into the JSON on stdout
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        with _progress_bar(f"{method} quantize", enabled=not (quiet or as_json)) as progress:
            summary = quantize_directory(model_dir, out, method=method, backend=backend,
                                         calibration_file=calibration, n_samples=samples, seq_len=seq_len,
                                         seed=seed, progress=progress, **options)
        if as_json:
            typer.echo(json.dumps(summary))
            return
        table = Table(title=f"llmtune quantize: {method}")
        table.add_column("field")
        table.add_column("value")
        for key, value in summary.items():
            table.add_row(key, str(value))
        Console().print(table)
