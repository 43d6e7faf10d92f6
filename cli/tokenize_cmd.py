"""``sar tokenize``: encode a dataset once into a code cache (the tokenizer is frozen)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli import _complete
from sar_cli._shared import (
    OVERRIDE,
    BACKBONE, CONFIG, DEVICE, FAMILY, SCHEDULE, TOKENIZER, fail, load_model, progress_bar, user_errors,
)


def cache_schedule(adapter, spec: Optional[str]):
    """The one schedule a cache holds: the model's, sides like 1_2_3_4, or a registered
    sampler's fixed schedule; every choice goes through the adapter's own size check."""
    from sar_core.plugins import get_registry
    from sar_core.schedule import ScheduleSampler
    from sar_core.train.trainer import build_schedule_sampler

    sampler = build_schedule_sampler(adapter, spec, 0, get_registry())
    adapter.check_schedule_sampler(sampler)
    if type(sampler) is not ScheduleSampler:
        raise ValueError(f"--schedule {spec} draws a new schedule every step, but a code cache holds one "
                         "schedule: pass sides like 1_2_3_4, or train from images")
    return sampler.default


def smallest_source_side(data: str, split: str, probe: int = 64) -> Optional[int]:
    """The smallest side among the first ``probe`` files of an image folder (None otherwise)."""
    from PIL import Image

    from sar_core.data.datasets import split_folder
    from sar_plugins.datasets import IMAGE_EXTENSIONS

    root = Path(data)
    if not root.is_dir():
        return None
    try:
        root = split_folder(root, split)
    except ValueError:
        return None  # opening the dataset says why
    files = (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    sides = []
    for p in itertools.islice(files, probe):
        try:
            with Image.open(p) as img:
                sides.append(min(img.size))
        except OSError:
            continue
    return min(sides) if sides else None


def tokenize(
    config: Optional[Path] = CONFIG,
    family: str = FAMILY,
    tokenizer: str = TOKENIZER,
    backbone: Optional[str] = typer.Option(None, "--backbone", envvar="SAR_BACKBONE", rich_help_panel="Model",
                                            help="Backbone checkpoint: only its schedule is used (without it, "
                                            "no backbone is built; pass --schedule to match the backbone you "
                                            "will train)."),
    data: str = typer.Option(..., "--data", rich_help_panel="Data", autocompletion=_complete.datasets,
                             help="A registered dataset name (e.g. digits), NAME:FOLDER "
                                  "(e.g. textimages:/data/captioned) or an image folder."),
    split: str = typer.Option("train", "--split", rich_help_panel="Data", help="Dataset split to encode."),
    image_size: Optional[str] = typer.Option(None, "--image-size", rich_help_panel="Data",
                                             help="S pixels a side or HxW; must match the schedule "
                                             "(default: the schedule's)."),
    allow_upscale: bool = typer.Option(False, "--allow-upscale", rich_help_panel="Data",
                                       help="Accept image-folder images smaller than the schedule's size (upscaled)."),
    schedule: Optional[str] = SCHEDULE,
    out: Path = typer.Option(..., "--out", "-o", rich_help_panel="Output", help="Cache folder to create."),
    flips: bool = typer.Option(False, "--flips", rich_help_panel="Output",
                               help="Also cache every image's horizontal mirror."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel="Output",
                                   help="Replace an existing cache folder."),
    batch_size: int = typer.Option(64, "--batch-size", rich_help_panel="Run", help="Images per encoder batch."),
    workers: int = typer.Option(0, "--workers", rich_help_panel="Run", help="DataLoader worker processes."),
    override: Optional[list[str]] = OVERRIDE,
    device: str = DEVICE,
) -> None:
    """Encode every image of a dataset split with the model's tokenizer into a memory-mapped
    code cache that training and `sar diagnose` can read instead of images.

    Example: [bold]sar tokenize -f var --tokenizer vae.pth --backbone var_d16.pth --data /data/imagenet
    --out codes/[/]"""
    from sar_core.checkpoint_io.hub import local_path
    from sar_core.data.code_cache import build_code_cache
    from sar_core.data.datasets import image_hw, parse_image_size
    from sar_core.data.datasets import open_dataset

    console = Console()
    try:
        from sar_cli._outputs import writable_folder

        writable_folder(out, "--out")  # before encoding anything
        adapter = load_model(console, family, tokenizer, backbone, device, overrides=override,
                             tokenizer_only=backbone is None)   # no throwaway backbone
        sched = cache_schedule(adapter, schedule)
        h, w = adapter.image_size(sched)
        if image_size is not None and image_hw(parse_image_size(image_size)) != (h, w):
            raise ValueError(f"--image-size {image_size} does not match schedule {sched}, which encodes "
                             f"{h}x{w} images; pass --image-size {h if h == w else f'{h}x{w}'} or another --schedule")
        origin = ("--schedule" if schedule else "the backbone's" if backbone else
                  "the family's default for this tokenizer alone: pass --schedule or --backbone to match "
                  "the backbone you will train")
        console.print(f"schedule {sched} ({origin}); images {h}x{w}", highlight=False)
        side = smallest_source_side(data, split)
        if side is not None and side < max(h, w) and not allow_upscale:
            raise ValueError(f"{data}: images as small as {side} px a side would be upscaled to {h}x{w} for "
                             f"schedule {sched}; pass a smaller --schedule, or --allow-upscale if intended")
        dataset = open_dataset(data, split=split, image_size=(h, w), deterministic=True)
        n = len(dataset) * (2 if flips else 1)
        with progress_bar(console, f"encoding {data}/{split}", len(dataset)) as advance:
            path = build_code_cache(adapter, dataset, sched, out, flips=flips, batch_size=batch_size,
                                    tokenizer_file=local_path(tokenizer), overwrite=overwrite, num_workers=workers,
                                    progress=advance)
    except user_errors() as exc:
        fail(console, exc)
    except OSError as exc:
        from sar_cli._outputs import write_failed

        fail(console, write_failed(exc, out, "--out"))
    console.print(f"wrote {n} items ({len(sched)} scales, schedule {sched}) to {path}")


def add_to(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
