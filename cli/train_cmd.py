"""``sar train``: SAR post-training from a run config and / or command-line flags.

Precedence: the ``--config`` file (YAML or TOML; with ``--resume`` and no ``--config``,
the run folder's own ``config.yaml``) < flags < ``--set key=value`` overrides. Multi-GPU:
``torchrun --nproc-per-node N -m sar_cli.main train ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

#: flag (python parameter name) -> dotted run-config field
FLAG_FIELDS = {
    "family": "model.family", "tokenizer": "model.tokenizer", "backbone": "model.backbone",
    "schedule": "model.schedule", "cond_drop": "model.cond_drop",
    "data": "data.name", "split": "data.split", "image_size": "data.image_size", "workers": "data.workers",
    "rollout": "rollout.name", "ssr_scales": "rollout.scales", "rollout_sampling": "rollout.sampling",
    "rollout_top_k": "rollout.top_k", "rollout_top_p": "rollout.top_p", "rollout_cfg": "rollout.cfg",
    "csfl": "loss.name", "csfl_temperature": "loss.temperature", "gamma": "loss.gamma",
    "label_smoothing": "loss.label_smoothing",
    "lr": "optim.lr", "lr_end": "optim.lr_end", "lr_schedule": "optim.lr_schedule",
    "warmup_steps": "optim.warmup_steps", "weight_decay": "optim.weight_decay", "betas": "optim.betas",
    "grad_clip": "optim.grad_clip",
    "steps": "train.steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "amp": "train.amp", "ema": "train.ema", "seed": "train.seed", "device": "train.device",
    "save_every": "train.save_every", "keep_last": "train.keep_last", "log_every": "train.log_every",
    "max_nonfinite": "train.max_nonfinite", "loggers": "train.loggers",
    "dist": "dist.strategy", "out": "out",
}


def _split_list(text: str, cast=str) -> list:
    return [cast(t) for t in text.replace(",", " ").split() if t]


def _image_size(text: str) -> Any:
    from sar_core.config import ConfigError
    from sar_core.data import parse_image_size

    try:
        size = parse_image_size(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return list(size) if isinstance(size, tuple) else size


def collect_overrides(flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    from sar_core.config import parse_set

    out: dict[str, Any] = {}
    for name, value in flags.items():
        if value is None or name not in FLAG_FIELDS:
            continue
        if isinstance(value, Path):
            value = str(value)
        if name == "betas":
            value = _split_list(value, float)
        elif name == "loggers":
            value = _split_list(value)
        elif name == "image_size":
            value = _image_size(value)
        out[FLAG_FIELDS[name]] = value
    out.update(parse_set(sets))
    return out


def resolve_config(config: Optional[Path], overrides: dict[str, Any], resume: bool, compile_flag: bool):
    from sar_core.config import build_config, read_config_file

    if resume:
        overrides["resume"] = True
    if compile_flag:
        overrides["train.compile"] = True
    if config is not None:
        base = read_config_file(config)
    else:
        base = {}
        if resume:
            out = Path(str(overrides.get("out", "runs/sar")))
            saved = out / "config.yaml"
            if saved.is_file():
                base = read_config_file(saved)
    return build_config(base, overrides)


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Run config file (YAML or TOML)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    family: Optional[str] = typer.Option(None, "--family", "-f", help="Model family (see `sar plugins`)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer checkpoint (upstream layout)."),
    backbone: Optional[Path] = typer.Option(None, "--backbone", help="Backbone checkpoint to post-train."),
    schedule: Optional[str] = typer.Option(None, "--schedule",
                                           help="Training schedule (1_2_3_4) or a schedule sampler (flexvar-random)."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset name, NAME:FOLDER (e.g. "
                                       "textimages:/data/captioned), image folder, or code cache folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Dataset split (default train)."),
    image_size: Optional[str] = typer.Option(None, "--image-size",
                                             help="Training image size: S pixels a side, or HxW (e.g. 256x512)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers per rank."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch per optimizer step."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-steps per optimizer step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-4)."),
    lr_end: Optional[float] = typer.Option(None, "--lr-end", help="Final lr of a linear / cosine decay."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant | linear | cosine."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    betas: Optional[str] = typer.Option(None, "--betas", help="AdamW betas, e.g. 0.9,0.95."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm (0: off)."),
    rollout: Optional[str] = typer.Option(None, "--rollout", help="none | ssr | official (or a plugin's)."),
    ssr_scales: Optional[str] = typer.Option(None, "--ssr-scales", help="all | last | random."),
    rollout_sampling: Optional[str] = typer.Option(None, "--rollout-sampling", help="argmax | sample."),
    rollout_top_k: Optional[int] = typer.Option(None, "--rollout-top-k"),
    rollout_top_p: Optional[float] = typer.Option(None, "--rollout-top-p"),
    rollout_cfg: Optional[float] = typer.Option(None, "--rollout-cfg", help="Guidance of a sampled rollout."),
    csfl: Optional[str] = typer.Option(None, "--csfl", help="hard | soft | naive (or a plugin's)."),
    csfl_temperature: Optional[float] = typer.Option(None, "--csfl-temperature", help="Soft CSFL temperature."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="CSF loss weight (default 0.01)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    cond_drop: Optional[float] = typer.Option(None, "--cond-drop", help="Class-dropout probability."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay (0: off)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="none | bf16 | fp16 (CUDA only)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the backbone."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints to keep."),
    log_every: Optional[int] = typer.Option(None, "--log-every"),
    max_nonfinite: Optional[int] = typer.Option(None, "--max-nonfinite",
                                                help="Stop after this many consecutive non-finite steps."),
    loggers: Optional[str] = typer.Option(None, "--loggers", help="e.g. console,jsonl,tensorboard."),
    dist: Optional[str] = typer.Option(None, "--dist", help="ddp | fsdp (under torchrun)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:1 ..."),
    sets: List[str] = typer.Option([], "--set", help="Override any field: --set optim.hold_fraction=0.05."),
) -> None:
    """Post-train a scale-wise AR model with SAR (or plain teacher forcing: --rollout none)."""
    from sar_core.config import ConfigError

    console = Console()
    flags = {k: v for k, v in locals().items() if k in FLAG_FIELDS}
    try:
        cfg = resolve_config(config, collect_overrides(flags, sets), resume, compile_model)
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    raise typer.Exit(run_training(cfg, console))


def run_training(cfg, console: Console) -> int:
    """Build the trainer, run it, report; returns the exit status."""
    from sar_cli._shared import user_errors
    from sar_core import distributed as D
    from sar_core.trainer import Trainer

    env = None
    try:
        env = D.init_distributed(cfg.train.device, cfg.dist.backend)
        log = console.print if env.is_main else (lambda *a, **k: None)
        trainer = Trainer(cfg, env=env, log=log)
        trainer.console = console
        result = trainer.run()
    except user_errors() as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        D.cleanup()
        return 2
    D.cleanup()
    if not env.is_main:
        return 0 if result.status == "finished" else 1
    if result.status == "finished":
        console.print(f"trained {result.step} steps; backbone written to {result.out_dir / 'backbone.pth'}; "
                      f"checkpoint {result.checkpoint}")
        return 0
    if result.status == "nonfinite":
        console.print(f"[bold red]error:[/] {result.message}; newest good checkpoint: {result.checkpoint}",
                      highlight=False)
        return 1
    console.print(f"[yellow]{result.message}[/]", highlight=False)
    return 130


def add_to(app: typer.Typer) -> None:
    app.command("train")(train)
