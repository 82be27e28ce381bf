"""`llmtune import-gguf FILE --out DIR`: a GGUF model written as an ordinary transformers model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("import-gguf")
    def import_gguf_command(
        file: Annotated[Path, typer.Argument(help="A .gguf file (or a directory holding exactly one).")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the model to.")],
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
    ) -> None:
        """Dequantize a GGUF model into DIR: safetensors, tokenizer, chat template and manifest.json."""
        from rich.console import Console

        from llmtune.models.loading import import_gguf

        target = import_gguf(file, out, dtype=dtype, overwrite=overwrite)
        if as_json:
            typer.echo(json.dumps({"source": str(file), "out": str(target), "dtype": dtype}))
        else:
            Console().print(f"model written to {target}")
