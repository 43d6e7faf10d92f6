"""``sar export-checkpoint CKPT --out DIR``: a run checkpoint's model as the family's files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def export_checkpoint(
    checkpoint: Path = typer.Argument(..., help="A run folder (its newest checkpoint), a checkpoint file "
                                      "(step_N.pt / .safetensors) or a sharded FSDP2 checkpoint (step_N.dcp/)."),
    out: Path = typer.Option(..., "--out", help="Folder for backbone.pth (and backbone_ema.pth when the run "
                             "keeps an EMA)."),
    save_format: str = typer.Option("pt", "--save-format", help="pt: the family's upstream layout "
                                    "(backbone.pth); safetensors: a plain backbone.safetensors."),
) -> None:
    """Write the model of any run checkpoint (an intermediate step, or a run that did not
    finish) in the upstream layout, as a finished run exports it. A sharded checkpoint is
    read whole in this process, on any machine (no GPU, no torchrun); the model is built
    from the run config the checkpoint holds (its tokenizer / backbone files must exist)."""
    from sar_cli._outputs import writable_folder
    from sar_cli._shared import fail, user_errors
    from sar_core.plugins import get_registry
    from sar_core.train.checkpointing import SUFFIXES
    from sar_core.train.export import export_checkpoint as export

    console = Console()
    try:
        if save_format not in SUFFIXES:
            raise ValueError(f"--save-format {save_format!r}: use one of {', '.join(SUFFIXES)}")
        writable_folder(out, "--out")
        with console.status(f"reading {checkpoint} ..."):
            step, written = export(checkpoint, out, get_registry(), save_format)
    except user_errors() as exc:
        fail(console, exc)
    console.print(f"step {step}: wrote " + ", ".join(str(p) for p in written), highlight=False)


def add_to(app: typer.Typer) -> None:
    app.command("export-checkpoint")(export_checkpoint)
