"""``sar demo``: the README's first command (no arguments needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import CONFIG, fail, user_errors


def demo(
    config: Optional[Path] = CONFIG,
    out: Path = typer.Option(Path("sar-demo-report"), "--out", help="Report (study) folder; an interrupted "
                             "demo resumes from what is there."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps per arm and seed (preset: 40)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Paired training seeds, comma list (preset: 0,1,2)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="(preset: 32)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate of both arms (preset: 2e-5, constant)."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="CSF loss weight of the SAR arm (preset: 0.5)."),
    samples_per_class: Optional[int] = typer.Option(None, "--samples-per-class",
                                                    help="Samples per class of every evaluation (preset: 200)."),
    sets: list[str] = typer.Option([], "--set", help="Any other study field, e.g. --set eval.noise_seeds=[1,2,3]."),
    jobs: int = typer.Option(2, "--jobs", help="Runs trained at once, one process and thread each (2 cores: 2)."),
    threads: Optional[int] = typer.Option(1, "--threads", help="torch CPU threads (the tiny demo model runs fastest on one)."),
) -> None:
    """The `demo` study preset on the shipped VAR miniature (digits-aug): plain teacher forcing vs
    SAR from the same start and paired seeds, every run evaluated with the same sampling
    seeds; the report gives paired differences with 95% intervals, the metric's measured
    noise and whether the control arm stayed flat, plus grids, gap curves and maps.
    Offline, CPU, minutes (same as `sar study --preset demo --out DIR`)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sar_cli.study_cmd import _summary
    from sar_core.train.config import parse_set
    from sar_plugins.demo import DemoSettings, demo_study, run_demo

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        seed_list = tuple(int(x) for x in seeds.split(",") if x.strip()) if seeds else None
        settings = DemoSettings(out=out, steps=steps, seeds=seed_list, batch_size=batch_size, lr=lr,
                                gamma=gamma, samples_per_class=samples_per_class, extra=parse_set(sets))
        study = demo_study(settings)
        total = len(study.seeds) * len(study.arms) * int(study.run["train"]["steps"])
        cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn())
        with Progress(*cols, console=console) as progress:
            task = progress.add_task("post-training", total=total)
            results = run_demo(settings, log=lambda m: progress.console.print(m, highlight=False),
                               advance=lambda n: progress.advance(task, n), jobs=max(1, jobs))
    except user_errors() as exc:
        fail(console, exc)
    except RuntimeError as exc:
        from sar_cli.study_cmd import job_failed

        job_failed(exc)
    _summary(console, results)
    console.print(f"report: {out / 'report.md'}  (also report.html, report.json, plots/, grids and maps)")


def add_to(app: typer.Typer) -> None:
    app.command("demo")(demo)
