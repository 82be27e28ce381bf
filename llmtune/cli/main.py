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
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of a failure (also LLMTUNE_DEBUG=1)."),
) -> None:
    """llmtune: fine-tune, quantize, evaluate and size LLMs."""


#: Subcommand modules under llmtune.cli; each defines ``register(app)``. Add yours here.
_COMMANDS = ("backends", "quantize", "eval", "memory", "train", "export", "models")
for _name in _COMMANDS:
    importlib.import_module(f"llmtune.cli.{_name}").register(app)


def _one_line(exc: BaseException) -> tuple[str, int]:
    """The message and exit code a failure is reported with: 2 for what the user can fix, 1 for the rest."""
    from llmtune.core.errors import LlmtuneError

    if isinstance(exc, LlmtuneError):
        return str(exc), 2
    if isinstance(exc, OSError) and exc.filename is not None:  # IsADirectory, Permission, FileExists, ...
        what = {IsADirectoryError: "is a directory, not a file", NotADirectoryError: "is not a directory",
                FileExistsError: "already exists", PermissionError: "permission denied",
                FileNotFoundError: "no such file or directory"}.get(type(exc), exc.strerror or str(exc))
        return f"{exc.filename}: {what}", 2
    if isinstance(exc, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({exc.reason} at byte {exc.start})", 2
    text = " ".join(str(exc).split()) or repr(exc)
    return f"{type(exc).__name__}: {text[:500]}", 1


def _report(exc: BaseException) -> int:
    from rich.console import Console
    from rich.markup import escape

    message, code = _one_line(exc)
    hint = "" if code == 2 else " (rerun with --debug for the traceback)"
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}{hint}", highlight=False)
    return code


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Any failure is one line on stderr (exit 2: fix the input; 1: anything else; 130 Ctrl-C;
    143 SIGTERM); ``--debug`` (anywhere on the line, or ``LLMTUNE_DEBUG=1``) shows the traceback instead."""
    import os
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LLMTUNE_DEBUG", "").strip().lower() in ("1", "true", "yes")
    args = [a for a in args if a != "--debug"]
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars on every command
    quiet_third_party()
    from llmtune.core.signals import EXIT_SIGINT, EXIT_SIGTERM, Terminated, exit_code, sigterm_raises

    try:
        with sigterm_raises() as term:  # SIGTERM is Ctrl-C: temporary outputs are removed, training saves a checkpoint
            try:
                app(args=args, prog_name="llmtune")
            except SystemExit as done:  # typer turns a KeyboardInterrupt (ours: `Terminated`) into exit 130
                if term.received and done.code == EXIT_SIGINT:
                    raise SystemExit(EXIT_SIGTERM) from None
                raise
    except SystemExit:
        raise
    except KeyboardInterrupt as exc:
        from rich.console import Console

        Console(stderr=True).print("[yellow]terminated[/]" if isinstance(exc, Terminated) else "[yellow]interrupted[/]")
        raise SystemExit(exit_code(exc)) from None
    except Exception as exc:
        if debug:
            raise
        raise SystemExit(_report(exc)) from None


def quiet_third_party() -> None:
    """Hide the advice bitsandbytes logs on import about an optional ``kernels`` package."""
    from llmtune.quantizers.bnb import quiet_bnb_import

    quiet_bnb_import()


if __name__ == "__main__":
    main()
