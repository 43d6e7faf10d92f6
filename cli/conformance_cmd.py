"""``sar conformance DIR``: check an adapter against a golden case."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3g}"


def conformance(
    case_dir: Path = typer.Argument(..., help="Golden case folder (config.json, case.pt, checkpoints)."),
    dump: Optional[Path] = typer.Option(None, "--dump", help="Write every computed output to this file "
                                        "(torch.save of a dict keyed like case.pt)."),
) -> None:
    """Run every recorded step of a golden case with the adapter its config.json names and
    compare each output with the upstream one. Exit status 0 only if every key passes."""
    from sar_cli._outputs import writable_file
    from sar_cli._shared import fail, user_errors
    from sar_core.conformance import run_conformance

    console = Console()
    try:
        writable_file(dump, "--dump")  # before running the case
        with console.status(f"running golden case {case_dir} ..."):
            report = run_conformance(case_dir, dump=dump)
    except user_errors() as exc:  # one line on stderr, however long (key lists) the message
        fail(console, exc)
    table = Table(title=f"conformance: {report.family} case {report.case_dir}",
                  caption="rule: what decides, b the recorded value; used: the worst element's |a-b| "
                          "over what the rule allows it (passes up to 1)")
    for col in ("key", "kind", "max abs err", "rule", "used", "result"):
        table.add_column(col)
    style = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "computed": "[cyan]computed[/]"}
    for r in report.results:
        table.add_row(r.key, r.kind, _fmt(r.max_abs), r.note, _fmt(r.used), style[r.status])
    console.print(table)
    n_fail = sum(r.status == "fail" for r in report.results)
    if dump is not None:
        console.print(f"wrote {len(report.computed)} outputs to {dump}")
    if report.compared == 0:
        console.print("no recorded outputs in case.pt: computed only, nothing compared")
    elif n_fail:
        console.print(f"[bold red]{n_fail} of {report.compared} keys failed[/]")
        raise typer.Exit(1)
    else:
        console.print(f"[green]all {report.compared} keys within tolerance[/]")


def add_to(app: typer.Typer) -> None:
    app.command("conformance")(conformance)
