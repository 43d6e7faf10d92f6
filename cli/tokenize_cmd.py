"""``sar tokenize``: encode a dataset once into a code cache (the tokenizer is frozen)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import BACKBONE, DEVICE, FAMILY, SCHEDULE, TOKENIZER, fail, load_model, progress_bar, user_errors


def tokenize(
    family: str = FAMILY,
    tokenizer: Path = TOKENIZER,
    backbone: Optional[Path] = BACKBONE,
    data: str = typer.Option(..., "--data", help="A registered dataset name (e.g. digits), NAME:FOLDER "
                             "(e.g. textimages:/data/captioned) or an image folder."),
    split: str = typer.Option("train", "--split", help="Dataset split to encode."),
    image_size: Optional[str] = typer.Option(None, "--image-size",
                                             help="S pixels a side or HxW; must match the schedule "
                                             "(default: the schedule's)."),
    schedule: Optional[str] = SCHEDULE,
    out: Path = typer.Option(..., "--out", help="Cache folder to create."),
    flips: bool = typer.Option(False, "--flips", help="Also cache every image's horizontal mirror."),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache folder."),
    device: str = DEVICE,
) -> None:
    """Encode every image of a dataset split with the model's tokenizer into a memory-mapped
    code cache that training and `sar diagnose` can read instead of images."""
    from sar_core.code_cache import build_code_cache
    from sar_core.data import image_hw, parse_image_size
    from sar_core.evaluation import open_dataset
    from sar_core.schedule import Schedule

    console = Console()
    try:
        adapter = load_model(console, family, tokenizer, backbone, device)
        sched = Schedule.parse(schedule) if schedule else adapter.default_schedule
        h, w = adapter.image_size(sched)
        if image_size is not None and image_hw(parse_image_size(image_size)) != (h, w):
            raise ValueError(f"--image-size {image_size} does not match schedule {sched}, which encodes "
                             f"{h}x{w} images; pass --image-size {h if h == w else f'{h}x{w}'} or another --schedule")
        dataset = open_dataset(data, split=split, image_size=(h, w), deterministic=True)
        n = len(dataset) * (2 if flips else 1)
        with progress_bar(console, f"encoding {data}/{split}", len(dataset)) as advance:
            path = build_code_cache(adapter, dataset, sched, out, flips=flips, batch_size=batch_size,
                                    tokenizer_file=tokenizer, overwrite=overwrite, num_workers=workers,
                                    progress=advance)
    except user_errors() as exc:
        fail(console, exc)
    console.print(f"wrote {n} items ({len(sched)} scales, schedule {sched}) to {path}")


def add_to(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
