"""``sar sample``: draw images from a model into a PNG grid and / or a folder of PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import (
    NULL_PAYLOAD, OVERRIDE, PAYLOAD, TEXT_FEATURES,
    BACKBONE, CFG, CONFIG, RANDOM_BACKBONE, DEVICE, FAMILY, TOP_K, TOP_P,
    SCHEDULE, TOKENIZER, condition_payloads, fail, load_model, progress_bar, user_errors,
)
from sar_cli._outputs import image_file, writable_folder, writing


def _labels(adapter, labels: Optional[str], per_class: Optional[int]):
    import torch

    from sar_core.evaluate.generation import parse_labels

    n_classes = adapter.num_classes
    if n_classes is None:
        raise ValueError(f"family '{adapter.name}' is not class-conditional; pass --payload NAME=FILE "
                         "(or --text-features FILE) instead of --labels / --per-class")
    if labels is not None:
        return torch.tensor(parse_labels(labels), dtype=torch.int64), None
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
    # class-major: row c of the grid holds the samples of class c
    return torch.arange(n_classes).repeat_interleave(per_class), per_class


def sample(
    config: Optional[Path] = CONFIG,
    family: str = FAMILY,
    tokenizer: str = TOKENIZER,
    backbone: Optional[str] = BACKBONE,
    random_backbone: bool = RANDOM_BACKBONE,
    labels: Optional[str] = typer.Option(None, "--labels", rich_help_panel="Conditions",
                                         help="Class labels, e.g. 1,2,3 (one image each)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", rich_help_panel="Conditions",
                                            help="N images of every class."),
    payload: Optional[list[str]] = PAYLOAD,
    text_features: Optional[Path] = TEXT_FEATURES,
    null_payload: Optional[list[str]] = NULL_PAYLOAD,
    cfg: float = CFG,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    seed: int = typer.Option(0, "--seed", rich_help_panel="Sampling", help="Sampling seed."),
    batch_size: int = typer.Option(32, "--batch-size", rich_help_panel="Sampling", help="Images per batch."),
    schedule: Optional[str] = SCHEDULE,
    grid: Optional[Path] = typer.Option(None, "--grid", rich_help_panel="Output",
                                        help="Write all samples as one PNG grid here."),
    nrow: Optional[int] = typer.Option(None, "--nrow", rich_help_panel="Output",
                                       help="Images per grid row (default: per class, or square)."),
    folder: Optional[Path] = typer.Option(None, "--folder", rich_help_panel="Output",
                                          help="Write one PNG per sample into this folder."),
    override: Optional[list[str]] = OVERRIDE,
    device: str = DEVICE,
) -> None:
    """Sample class-conditional images, or one image per row of the condition payloads
    (--payload NAME=FILE, repeatable; text-conditioned families), from a model.

    Example: [bold]sar sample -f var --tokenizer vae.pth --backbone var_d16.pth --per-class 4 --grid s.png[/]"""
    from sar_core.evaluate.generation import condition_batch, generate_images, save_folder, save_grid
    from sar_core.schedule import Schedule

    console = Console()
    try:
        payloads = payload or ([] if text_features is None else ["text_features"])
        chosen = [o for o in (labels, per_class, payloads or None) if o is not None]
        if len(chosen) != 1:
            raise ValueError("pass exactly one of --labels, --per-class, --payload NAME=FILE / --text-features")
        if grid is None and folder is None:
            raise ValueError("nothing to write: pass --grid FILE.png and/or --folder DIR")
        image_file(grid, "--grid")  # before any sampling: a bad output path loses no work
        writable_folder(folder, "--folder")
        adapter = load_model(console, family, tokenizer, backbone, device, random_backbone, override,
                             null_payloads=null_payload, needs_null=True)
        sched = Schedule.parse(schedule) if schedule else adapter.default_schedule
        opts = dict(schedule=sched, cfg=cfg, top_k=top_k, top_p=top_p, seed=seed)
        conditions = condition_payloads(adapter, payload, text_features)
        if conditions is not None:
            batch = condition_batch(conditions)
            lab, row, n = None, nrow, len(batch)
            opts["conditions"] = batch
        else:
            lab, row = _labels(adapter, labels, per_class)
            n = len(lab)
        with progress_bar(console, "sampling", n) as advance:
            images = generate_images(adapter, lab, batch_size=batch_size, progress=advance, **opts)
    except user_errors() as exc:
        fail(console, exc)
    if grid is not None:
        with writing(console, grid, "--grid"):
            save_grid(images, grid, nrow=nrow or row)
        console.print(f"wrote grid of {len(images)} images to {grid}")
    if folder is not None:
        with writing(console, folder, "--folder"):
            save_folder(images, folder, None if lab is None else lab.tolist())
        console.print(f"wrote {len(images)} PNGs to {folder}")


def add_to(app: typer.Typer) -> None:
    app.command("sample")(sample)
