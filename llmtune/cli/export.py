"""`llmtune export RUN_OR_ADAPTER --format gguf|ollama|hf|gguf-lora --dtype f16|bf16|q8_0|q4_0|q4_k_m|... --out DIR` and `--check vllm`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def _check(path: Path, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from llmtune.export import check_vllm

    findings = check_vllm(path)
    refused = [f for f in findings if f.severity == "refused"]
    if as_json:
        typer.echo(json.dumps({"vllm": [f.__dict__ for f in findings], "loads": not refused}))
    elif not findings:
        Console().print(f"vLLM will load {path} as a LoRA adapter (--enable-lora); nothing to change.")
    else:
        table = Table(title=f"vLLM check: {path}")
        for column in ("kind", "severity", "what vLLM does", "do instead"):
            table.add_column(column)
        for f in findings:
            table.add_row(f.kind, f.severity, f.message, f.fix)
        Console().print(table)
    if refused:
        raise typer.Exit(1)


def _export(path: Path, out: Path, options: dict[str, Any], quiet: bool, as_json: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from transformers.utils import logging as hf_logging

    from llmtune.export import export

    hf_logging.disable_progress_bar()  # the CLI draws its own bars
    if quiet or as_json:
        result = export(path, out, **options)
    else:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()) as bar:
            tasks: dict[str, Any] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done, total=total)

            result = export(path, out, progress=progress, **options)
    if as_json:
        typer.echo(json.dumps({**result.info, "out_dir": str(result.out_dir), "files": result.files}, default=str))
        return
    console = Console()
    for note in result.notes:
        Console(stderr=True).print(f"[yellow]note[/]: {note}", highlight=False)
    console.print(f"exported {path} -> {result.out_dir} ({result.format}, {result.info['dtype']}); "
                  f"merged into: {result.info['merged_into']}")
    for name, digest in result.files.items():
        console.print(f"  {digest[:16]}  {name}")


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        path: Annotated[Path, typer.Argument(help="A training run, an adapter directory, a model directory or a .gguf file.")],
        out: Annotated[Path | None, typer.Option("--out", help="Output directory (new or empty).")] = None,
        fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp), ollama (GGUF + Modelfile), hf, or gguf-lora (the adapter alone)."),
        dtype: str = typer.Option("f16", "--dtype", help="gguf/ollama: f16, bf16, q8_0, q4_0, q4_k_m, q5_k_m, q6_k; gguf-lora: f16, bf16, q8_0, q4_0; hf: f32, f16, bf16."),
        check: str = typer.Option(None, "--check", help="Only check what a server will refuse: vllm."),
        base: str = typer.Option(None, "--base", help="Base model (default: what the adapter records)."),
        template: str = typer.Option(None, "--template", help="Chat template (default: the run's)."),
        requantize: str = typer.Option(None, "--requantize", help="hf only: quantize the merged model (nf4, int8)."),
        pre_tokenizer: str = typer.Option(None, "--pre-tokenizer", help="llama.cpp pre-tokenizer name override."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty output directory."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
    ) -> None:
        """Export a run/adapter merged into its base (GGUF, Ollama, HF safetensors), or check it for vLLM."""
        from llmtune.core.errors import InvalidOptionError

        if check is not None:
            if check != "vllm":
                raise InvalidOptionError(f"--check {check!r}: the only check is 'vllm'")
            _check(path, as_json)
            return
        if out is None:
            raise InvalidOptionError("--out DIR is required (or use --check vllm)")
        options = {"format": fmt, "dtype": dtype, "base": base, "template": template, "requantize": requantize,
                   "pre_tokenizer": pre_tokenizer, "overwrite": overwrite}
        _export(path, out, options, quiet, as_json)
