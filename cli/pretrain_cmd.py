"""``sar pretrain``: fit a tokenizer and teacher-force a fresh backbone (small models)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from sar_cli import _complete
from sar_cli._shared import CONFIG, DEVICE, FAMILY, fail, user_errors


def pretrain(
    config: Optional[Path] = CONFIG,
    family: str = FAMILY,
    model_config: Path = typer.Option(..., "--model-config", help="YAML/JSON file of the family's model "
                                      "config fields (sizes, schedule) for the fresh model."),
    data: str = typer.Option("digits", "--data", autocompletion=_complete.datasets,
                             help="Registered dataset or image folder (with train/val splits)."),
    image_size: int = typer.Option(16, "--image-size", help="Pixels a side."),
    tokenizer_steps: int = typer.Option(600, "--tokenizer-steps", help="Tokenizer fit steps."),
    tokenizer_lr: float = typer.Option(2e-3, "--tokenizer-lr", help="Tokenizer fit learning rate."),
    steps: int = typer.Option(3000, "--steps", help="Teacher-forcing steps of the backbone."),
    batch_size: int = typer.Option(64, "--batch-size", help="Batch of both stages."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak lr (cosine decay to --lr-end after warm-up)."),
    lr_end: Optional[float] = typer.Option(None, "--lr-end", help="Final lr of the cosine decay (default: "
                                           "1% of --lr). Set it to the lr you will post-train with, so that "
                                           "continuing at that lr does not anneal the model further."),
    warmup_steps: int = typer.Option(100, "--warmup-steps", help="Linear warm-up steps of the backbone."),
    eval_every: int = typer.Option(100, "--eval-every", help="Validate the TF loss every N steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, data order and splits."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    out: Path = typer.Option(Path("runs/pretrain"), "--out", help="Output folder."),
    device: str = DEVICE,
) -> None:
    """Build a small model from nothing: fit the tokenizer, then teacher-force a fresh
    backbone with validation, keeping the best one. Writes tokenizer.pth, backbone.pth
    (the family's upstream formats) and pretrain.json (with the command that made them)."""
    import torch
    import yaml
    from rich.progress import Progress

    from sar_core.train.pretrain import pretrain as run_pretrain

    console = Console()
    if threads:
        torch.set_num_threads(threads)
    try:
        from sar_cli._outputs import writable_folder

        writable_folder(out, "--out")  # before fitting anything
        if not model_config.is_file():
            raise FileNotFoundError(f"model config not found: {model_config}")
        try:
            model = yaml.safe_load(model_config.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--model-config {model_config}: cannot parse it: {exc}") from None
        if not isinstance(model, dict):
            raise ValueError(f"{model_config} must hold a mapping of model config fields")
        args = ["-f", family, "--model-config", model_config, "--data", data, "--image-size", image_size,
                "--tokenizer-steps", tokenizer_steps, "--tokenizer-lr", tokenizer_lr, "--steps", steps,
                "--batch-size", batch_size, "--lr", lr, *(["--lr-end", lr_end] if lr_end is not None else []),
                "--warmup-steps", warmup_steps,
                "--eval-every", eval_every, "--seed", seed, "--out", out]
        if threads:
            args += ["--threads", threads]
        command = "sar pretrain " + " ".join(shlex.quote(str(a)) for a in args)
        with Progress(console=console, transient=True) as progress:
            summary = run_pretrain(family, model, data, image_size, out, tokenizer_steps=tokenizer_steps,
                                   tokenizer_lr=tokenizer_lr, steps=steps, batch_size=batch_size, lr=lr,
                                   lr_end=lr_end,
                                   warmup_steps=warmup_steps, eval_every=eval_every, seed=seed,
                                   device=device, command=command, progress=progress, log=console.print)
    except user_errors() as exc:
        fail(console, exc)
    console.print(f"[green]done[/]: {out}/tokenizer.pth, {out}/backbone.pth, {out}/pretrain.json "
                  f"(validation curve flattened: {summary['converged']})")


def add_to(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
