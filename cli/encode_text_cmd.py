"""``sar encode-text``: captions -> the condition payloads ``textimages`` (and ``sar sample
--payload``) read, with a local T5 or CLIP text encoder (extra ``sar[text]``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli._shared import DEVICE, fail, progress_bar, user_errors


def encode_text(
    captions: Path = typer.Argument(..., help="A textimages manifest (captions.jsonl: image + caption per line) "
                                    "or a text file of prompts, one a line."),
    encoder: str = typer.Option(..., "--encoder", "-e", rich_help_panel="Encoder",
                                help="t5 (Infinity: payload text_features) or clip (payloads clip_pooled, "
                                "clip_tokens)."),
    model: Path = typer.Option(..., "--model", "-m", rich_help_panel="Encoder", envvar="SAR_TEXT_MODEL",
                               help="LOCAL model folder in save_pretrained layout (config.json, weights, "
                               "tokenizer); nothing is downloaded."),
    max_length: Optional[int] = typer.Option(None, "--max-length", rich_help_panel="Encoder",
                                             help="Tokens per caption at most (default: the encoder's "
                                             "positions, 512 for T5)."),
    dtype: str = typer.Option("float32", "--dtype", rich_help_panel="Encoder",
                              help="float32 | bfloat16 | float16 (the encoder's compute type; features are "
                              "stored as float32)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", rich_help_panel="Output",
                                       help="For a prompts file: the folder for <name>.pt and null_payloads.pt "
                                       "(a manifest's payloads go beside it)."),
    batch_size: int = typer.Option(32, "--batch-size", rich_help_panel="Run", help="Captions per forward pass."),
    device: str = DEVICE,
) -> None:
    """Encode captions into condition payloads with a local T5 encoder or CLIP text model.

    A manifest DIR/captions.jsonl gets DIR/payloads/<name>/<image>.pt per image
    (what --data textimages:DIR reads) and DIR/null_payloads.pt (the features
    of the empty prompt); a prompts file gets OUT/<name>.pt lists for
    sar sample --payload NAME=FILE. Every file is written atomically: after an
    interruption, run the same command again to continue.

    Example: [bold]sar encode-text /data/captioned/captions.jsonl --encoder t5 --model /models/flan-t5-xl[/]"""
    import torch

    from sar_core.evaluate.generation import resolve_device
    from sar_plugins.text_encode import TextEncoder, manifest_job, prompts_job, run

    console = Console()
    stop = {"asked": False}
    try:
        if not captions.is_file():
            raise FileNotFoundError(f"captions file not found: {captions}")
        kinds = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if dtype not in kinds:
            raise ValueError(f"--dtype must be one of {', '.join(kinds)}, got {dtype!r}")
        job = manifest_job(captions) if captions.suffix == ".jsonl" else prompts_job(captions, out)
        if job.gather is None and out is not None:
            raise ValueError("--out is for prompts files; a manifest's payloads go beside it (DIR/payloads/)")
        with console.status(f"loading the {encoder} encoder from {model}"):
            enc = TextEncoder(encoder, model, resolve_device(device), kinds[dtype], max_length)
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(asked=True))
        try:
            with progress_bar(console, f"encoding ({encoder})", len(job.keys)) as advance:
                before, written = run(job, enc, batch_size, advance, lambda: stop["asked"])
        finally:
            signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted: every finished caption is written; run the same command "
                                   "again to continue", style="yellow", highlight=False)
        raise typer.Exit(130)
    except user_errors() as exc:
        fail(console, exc)
    total = before + written
    if before:
        console.print(f"resumed: {before} of {len(job.keys)} captions were already encoded", highlight=False)
    if stop["asked"] and total < len(job.keys):
        console.print(f"stopped (SIGTERM) after {total} of {len(job.keys)} captions; run the same command again "
                      "to continue", style="yellow", highlight=False)
        raise typer.Exit(143)
    where = job.gather if job.gather is not None else job.folder / "payloads"
    console.print(f"encoded {written} captions ({total} of {len(job.keys)} done): payloads "
                  f"{', '.join(enc.names)} in {where}, the empty prompt's in {job.folder / 'null_payloads.pt'}",
                  highlight=False)


def add_to(app: typer.Typer) -> None:
    app.command("encode-text")(encode_text)
