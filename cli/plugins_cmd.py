"""``sar plugins``: list every registered adapter, rollout, loss, schedule, dataset, metric, logger."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
) -> None:
    """List everything plugins registered, and which plugin and package provide it."""
    from sar_core.plugins import get_registry

    reg = get_registry()
    rows = reg.rows()
    if as_json:
        typer.echo(json.dumps({"entries": rows, "errors": reg.errors}, indent=2))
        return
    console = Console()
    table = Table(title="sar plugins", show_lines=False)
    for col in ("kind", "name", "plugin", "package", "object"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"])):
        table.add_row(r["kind"], r["name"], r["plugin"], r["package"], r["object"])
    console.print(table)
    for err in reg.errors:
        console.print(f"[bold red]plugin error:[/] {err}", highlight=False)


def add_to(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
