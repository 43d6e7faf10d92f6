"""``sar demo``: the README's first command (no arguments needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import CONFIG, fail, user_errors


def demo(
    config: Optional[Path] = CONFIG,
    out: Path = typer.Option(Path("sar-demo-report"), "--out", help="Report folder."),
    steps: int = typer.Option(150, "--steps", help="Optimizer steps per arm and seed."),
    seeds: str = typer.Option("0,1", "--seeds", help="Training seeds (comma list); the report gives mean ± std."),
    batch_size: int = typer.Option(32, "--batch-size", help="Batch per optimizer step."),
    lr: float = typer.Option(1e-4, "--lr", help="Learning rate of both arms (constant)."),
    gamma: float = typer.Option(0.5, "--gamma", help="CSF loss weight of the SAR arm."),
    samples_per_class: int = typer.Option(50, "--samples-per-class", help="Samples per class for FID etc."),
    threads: Optional[int] = typer.Option(1, "--threads",
                                          help="torch CPU threads (the tiny demo model runs fastest on one)."),
) -> None:
    """Post-train the shipped tiny digits model two ways from the same start and seeds
    (plain teacher forcing vs SAR), evaluate both, and write a report with tables, sample
    grids and plots. Offline, CPU, a few minutes."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sar_plugins.demo import DemoSettings, run_demo

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip())
        if not seed_list or steps < 1 or samples_per_class < 2:
            raise ValueError("need at least one seed, --steps >= 1 and --samples-per-class >= 2")
        settings = DemoSettings(out=out, steps=steps, seeds=seed_list, batch_size=batch_size, lr=lr,
                                gamma=gamma, samples_per_class=samples_per_class)
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())
        with Progress(*cols, console=console) as progress:
            results = run_demo(settings, progress=progress, log=progress.console.print)
    except user_errors() as exc:
        fail(console, exc)
    from rich.table import Table

    from sar_plugins.demo_report import table_rows

    table = Table(title=f"sar demo: {steps} steps per arm, seeds {list(seed_list)}")
    for col in ["metric", *results["arms"], "better"]:
        table.add_column(col)
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {out / 'report.md'}  (also report.html, samples_*.png, losses_and_gaps.png)")


def add_to(app: typer.Typer) -> None:
    app.command("demo")(demo)
