"""``sar plugins``: every registered adapter, rollout, loss, schedule, dataset, metric and
logger, and every plugin with its package version and the hooks it implements."""

from __future__ import annotations

import importlib.metadata as md
import json

import typer
from rich.console import Console
from rich.table import Table


def plugin_rows(reg) -> list[dict]:
    """One row per registered plugin: name, package, version, implemented hooks."""
    from sar_core.plugins import ENTRY_POINT_GROUP

    dists = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is not None:
            dists[ep.name] = (ep.dist.name, ep.dist.version)
    rows = []
    for name, plugin in reg.pm.list_name_plugin():
        if plugin is None:
            continue
        hooks = sorted(h.name for h in (reg.pm.get_hookcallers(plugin) or []))
        package, version = dists.get(name, ("(not installed)", "-"))
        rows.append({"plugin": name, "package": package, "version": version, "hooks": hooks})
    return sorted(rows, key=lambda r: r["plugin"])


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """List everything plugins registered, and each plugin's package, version and hooks."""
    from sar_core.plugins import get_registry

    reg = get_registry()
    rows, owners = reg.rows(), plugin_rows(reg)
    if as_json:
        from sar_core.plugins import undeclared

        typer.echo(json.dumps({"entries": rows, "plugins": owners, "errors": reg.errors,
                               "undeclared": undeclared(reg)}, indent=2))
        return
    console = Console()
    table = Table(title="sar plugins", show_lines=False)
    for col in ("kind", "name", "plugin", "package", "object"):
        table.add_column(col)
    for r in sorted(rows, key=lambda r: (r["kind"], r["name"])):
        table.add_row(r["kind"], r["name"], r["plugin"], r["package"], r["object"])
    console.print(table)
    owners_table = Table(title="plugins", show_lines=False)
    for col in ("plugin", "package", "version", "hooks"):
        owners_table.add_column(col)
    for r in owners:
        owners_table.add_row(r["plugin"], r["package"], r["version"], ", ".join(r["hooks"]))
    console.print(owners_table)
    for err in reg.errors:
        console.print(f"[bold red]plugin error:[/] {err}", highlight=False)
    from sar_core.plugins import undeclared

    for note in undeclared(reg):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def add_to(app: typer.Typer) -> None:
    app.command("plugins")(plugins)
