"""Entry point of the `llmtune` console script; each subcommand lives in its own module."""

from __future__ import annotations

import importlib

import typer

from llmtune._version import __version__

app = typer.Typer(
    name="llmtune",
    help="LLM fine-tuning, quantization, evaluation and GPU-memory planning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """llmtune: fine-tune, quantize, evaluate and size LLMs."""


#: Subcommand modules under llmtune.cli; each defines ``register(app)``. Add yours here.
_COMMANDS = ("backends", "quantize", "eval", "memory", "train", "export")
for _name in _COMMANDS:
    importlib.import_module(f"llmtune.cli.{_name}").register(app)


def main() -> None:
    """Run the CLI; an `LlmtuneError` becomes a one-line message and exit code 2."""
    from llmtune.core.errors import LlmtuneError

    try:
        app()
    except LlmtuneError as exc:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
