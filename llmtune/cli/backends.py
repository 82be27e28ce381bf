"""`llmtune backends`: the registry as a table (kind, name, backend, default, available, why not)."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("backends")
    def backends(
        kind: str = typer.Option(None, "--kind", help="Only this kind: metric, quantizer, trainer, task or reward."),
        as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
    ) -> None:
        """List every registered backend and whether it can run on this machine."""
        import dataclasses

        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        from llmtune.core.registry import list_backends

        rows = list_backends(kind)
        if as_json:
            for row in rows:
                typer.echo(json.dumps(dataclasses.asdict(row)))
            return
        table = Table(title="llmtune backends")
        for col in ("kind", "name", "backend", "default", "available", "why not"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r.kind, r.name, r.backend, "yes" if r.default else "",
                          "[green]yes[/]" if r.available else "[red]no[/]", escape(r.reason or ""))
        console = Console()
        console.print(table)
        if kind in (None, "trainer"):
            console.print(_matrix_table())


def _matrix_table() -> object:
    """The trainer support matrix: objective x backend -> methods (and those that train on a quantized base)."""
    from rich.table import Table

    from llmtune.trainers.matrix import support_matrix

    table = Table(title="trainer support matrix (objective x method x backend)")
    for col in ("trainer", "objective", "backend", "methods", "on a quantized base", "packing", "quantizers",
                "refused"):
        table.add_column(col, overflow="fold")
    for r in support_matrix():
        table.add_row(r.name, r.objective, r.backend, ", ".join(r.methods), ", ".join(r.quantized) or "-",
                      ", ".join(r.packing) or "-",
                      ", ".join(r.quantizers) if r.quantizers is not None else "any trainable",
                      "; ".join(f"{m}: {why}" for m, why in r.refused) or "-")
    return table
