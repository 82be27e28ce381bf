"""`llmtune backends`: the registry as a table (kind, name, backend, default, available, why not)."""

from __future__ import annotations

import json

import typer


def register(app: typer.Typer) -> None:
    @app.command("backends")
    def backends(
        kind: str = typer.Option(None, "--kind", help="Only this kind: metric, quantizer, trainer or task."),
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
        Console().print(table)
