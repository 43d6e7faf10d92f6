"""``sar diagnose``: per-scale exposure gap (teacher- vs one-step student-forced loss)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from sar_cli import _complete
from sar_cli._shared import (
    OVERRIDE,
    BACKBONE, CONFIG, RANDOM_BACKBONE, DEVICE, FAMILY, SCHEDULE, TOKENIZER, fail, load_model, user_errors,
)
from sar_cli._outputs import plot_file, writable_file, writable_folder, writing


def _fmt(v, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def print_gap(console: Console, report: dict) -> None:
    table = Table(title=f"exposure gap: {report['family']} ({report['mode']}, {report['num_samples']} samples)")
    for col in ("scale", "size", "TF CE", "SF CE", "gap CE", "TF acc", "SF acc", "gap acc", "input err"):
        table.add_column(col, justify="right")
    for r in report["scales"]:
        table.add_row(str(r["scale"]), "x".join(map(str, r["size"])), _fmt(r["tf_ce"]), _fmt(r["sf_ce"]),
                      _fmt(r["gap_ce"], True), _fmt(r["tf_acc"]), _fmt(r["sf_acc"]), _fmt(r["gap_acc"], True),
                      _fmt(r["input_error"]))
    console.print(table)
    console.print(f"mean gap: CE {report['mean_gap_ce']:+.4f}, accuracy {report['mean_gap_acc']:+.4f}")


def _data(data: str, adapter, schedule: Optional[str], split: str):
    """(dataset, schedule): a code cache brings its own schedule unless --schedule is given."""
    from sar_core.data.code_cache import META, CodeCacheDataset, read_meta
    from sar_core.data.datasets import open_dataset
    from sar_core.schedule import Schedule

    if (Path(data) / META).is_file():
        sched = Schedule.parse(schedule or read_meta(data)["schedule"])
        return CodeCacheDataset(data, adapter, sched, flips="none"), sched
    sched = Schedule.parse(schedule) if schedule else adapter.default_schedule
    return open_dataset(data, split=split, image_size=adapter.image_size(sched), deterministic=True), sched


def diagnose(
    config: Optional[Path] = CONFIG,
    family: str = FAMILY,
    tokenizer: str = TOKENIZER,
    backbone: Optional[str] = BACKBONE,
    random_backbone: bool = RANDOM_BACKBONE,
    data: str = typer.Option(..., "--data", rich_help_panel="Data", envvar="SAR_DATA",
                             autocompletion=_complete.datasets,
                             help="Dataset name, NAME:FOLDER, image folder, or code cache folder."),
    split: str = typer.Option("val", "--split", rich_help_panel="Data",
                              help="Split of a dataset (ignored for a code cache); of an image folder its <split> "
                              "sub-folder, or the folder itself when so named ('.': the folder itself, "
                              "whatever its name; a missing split is refused)."),
    schedule: Optional[str] = SCHEDULE,
    batches: Optional[int] = typer.Option(10, "--batches", rich_help_panel="Run",
                                          help="Batches to use (0: the whole split)."),
    batch_size: int = typer.Option(32, "--batch-size", rich_help_panel="Run", help="Images per batch."),
    mode: str = typer.Option("per_scale", "--mode", rich_help_panel="Run",
                             help="per_scale (one transition per pass) or joint."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel="Output",
                                       help="Write the report as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", rich_help_panel="Output", help="Write a PNG plot here."),
    maps: Optional[Path] = typer.Option(None, "--maps", rich_help_panel="Output",
                                        help="Write per-scale difference maps (PNG: where predictions on own "
                                        "inputs differ from those on ground-truth inputs) here."),
    override: Optional[list[str]] = OVERRIDE,
    device: str = DEVICE,
) -> None:
    """Measure, per scale, how much the loss grows when the model's input at scale k+1 is
    built from its own greedy prediction at scale k instead of the ground truth."""
    from sar_core.checkpoint_io import atomic_write_text
    from sar_core.evaluate.diagnostics import exposure_gap, plot_exposure_gap

    console = Console()
    try:
        writable_file(out, "--out")  # before the passes: a bad output path loses no work
        plot_file(plot, "--plot")
        writable_folder(maps, "--maps")
        adapter = load_model(console, family, tokenizer, backbone, device, random_backbone, override)
        dataset, sched = _data(data, adapter, schedule, split)
        from sar_core.data.payloads import check_dataset_payloads

        check_dataset_payloads(adapter, dataset, f"--data {data}")
        with console.status("teacher- and student-forced passes ..."):
            with_maps = maps is not None and mode == "per_scale"  # one set of passes for both
            report = exposure_gap(adapter, dataset, sched, batches or None, batch_size=batch_size, mode=mode,
                                  maps=with_maps)
            if maps is not None:
                from sar_core.evaluate.difference_maps import difference_maps, save_difference_maps

                diff = ({"family": adapter.name, "schedule": report["schedule"], "num_samples": report["num_samples"],
                         "maps": report.pop("maps")} if with_maps else
                        difference_maps(adapter, dataset, sched, batches or None, batch_size=batch_size))
    except user_errors() as exc:
        fail(console, exc)
    print_gap(console, report)
    if out is not None:
        with writing(console, out, "--out"):
            atomic_write_text(json.dumps(report, indent=2), out)
        console.print(f"wrote {out}")
    if plot is not None:
        with writing(console, plot, "--plot"):
            plot_exposure_gap(report, plot)
        console.print(f"wrote {plot}")
    if maps is not None:
        with writing(console, maps, "--maps"):
            save_difference_maps(diff, maps)
        console.print(f"wrote difference maps to {maps}/ (scale_KK.png, all_scales.png)")


def add_to(app: typer.Typer) -> None:
    app.command("diagnose")(diagnose)
