"""``sar train``: SAR post-training from a run config and / or command-line flags.

Precedence: the ``--config`` file (YAML or TOML; with ``--resume`` and no ``--config``,
the run folder's own ``config.yaml``) < flags < ``--set key=value`` overrides. Multi-GPU:
``torchrun --nproc-per-node N -m sar_cli.main train ...``.

Exit status: 0 trained; 1 stopped by the non-finite guard, a frozen peer rank or a crash;
2 bad input (one line on stderr naming the fix; also a ``--resume`` whose checkpoints are
all unreadable: nothing is changed, ``--restart`` starts over); 130 Ctrl-C; 143 SIGTERM /
SIGUSR1 (checkpoint written, continue with ``--resume``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from sar_cli import _complete

#: flag (python parameter name) -> dotted run-config field
FLAG_FIELDS = {
    "family": "model.family", "tokenizer": "model.tokenizer", "random_tokenizer": "model.random_tokenizer",
    "backbone": "model.backbone",
    "schedule": "model.schedule", "cond_drop": "model.cond_drop", "resize_classes": "model.resize_classes",
    "null_payload": "model.null_payloads",
    "class_map": "data.options.class_map",
    "data": "data.name", "split": "data.split", "image_size": "data.image_size", "workers": "data.workers",
    "rollout": "rollout.name", "ssr_scales": "rollout.scales", "ssr_depth": "rollout.depth",
    "rollout_sampling": "rollout.sampling",
    "rollout_top_k": "rollout.top_k", "rollout_top_p": "rollout.top_p", "rollout_cfg": "rollout.cfg",
    "csfl": "loss.name", "csfl_temperature": "loss.temperature", "gamma": "loss.gamma",
    "label_smoothing": "loss.label_smoothing",
    "lr": "optim.lr", "lr_end": "optim.lr_end", "lr_schedule": "optim.lr_schedule",
    "warmup_steps": "optim.warmup_steps", "weight_decay": "optim.weight_decay", "betas": "optim.betas",
    "grad_clip": "optim.grad_clip",
    "steps": "train.steps", "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
    "amp": "train.amp", "ema": "train.ema", "seed": "train.seed", "device": "train.device",
    "save_every": "train.save_every", "save_format": "train.save_format", "keep_last": "train.keep_last", "log_every": "train.log_every",
    "max_nonfinite": "train.max_nonfinite", "loggers": "train.loggers",
    "dist": "dist.strategy", "out": "out",
    "eval_every": "eval.every", "eval_at_end": "eval.at_end", "val_data": "eval.data", "eval_images": "eval.images",
    "eval_samples": "eval.samples", "feature_extractor": "eval.feature_extractor",
    "feature_weights": "eval.extractor_weights",
}


def _split_list(text: str, cast=str) -> list:
    return [cast(t) for t in text.replace(",", " ").split() if t]


def _image_size(text: str) -> Any:
    from sar_core.train.config import ConfigError
    from sar_core.data.datasets import parse_image_size

    try:
        size = parse_image_size(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return list(size) if isinstance(size, tuple) else size


def _null_payloads(pairs: list[str]) -> dict[str, str]:
    from sar_core.data.payloads import null_payload_files
    from sar_core.train.config import ConfigError

    try:
        return {k: str(v) for k, v in null_payload_files(pairs).items()}
    except Exception as exc:  # a missing / unreadable file: one config error line
        raise ConfigError(" ".join(str(exc).split())) from None


def collect_overrides(flags: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    from sar_core.train.config import parse_set

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
        elif name == "null_payload":
            if not value:
                continue
            value = _null_payloads(value)
        out[FLAG_FIELDS[name]] = value
    out.update(parse_set(sets))
    return out


def resolve_config(config: Optional[Path], overrides: dict[str, Any], resume: bool, compile_flag: bool,
                   accept_data_change: bool = False):
    from sar_core.train.config import ConfigError, build_config, read_config_file

    if resume:
        overrides["resume"] = True
    overrides["accept_data_change"] = bool(accept_data_change)  # this invocation's answer, never a saved one
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
            elif "model.family" not in overrides or "data.name" not in overrides:
                what = "does not exist" if not out.exists() else "holds no run (no config.yaml)"
                raise ConfigError(f"--resume: the run folder {out} {what}; pass the --out of an existing run, "
                                  "or drop --resume to start a new one")
    return build_config(base, overrides)


def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Run config file (YAML or TOML)."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    family: Optional[str] = typer.Option(None, "--family", "-f", autocompletion=_complete.names("adapter"),
                                         help="Model family (see `sar plugins`)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer checkpoint (upstream layout, "
                                            ".safetensors, or hf://OWNER/REPO/FILE[@REVISION]); required "
                                            "unless --random-tokenizer."),
    random_tokenizer: bool = typer.Option(False, "--random-tokenizer",
                                          help="Train with a freshly initialised tokenizer on purpose (smoke "
                                          "tests: its codes mean nothing)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Backbone checkpoint to post-train (as --tokenizer)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", autocompletion=_complete.names("schedule"),
                                           help="Training schedule (1_2_3_4) or a schedule sampler (flexvar-random)."),
    data: Optional[str] = typer.Option(None, "--data", autocompletion=_complete.datasets,
                                       help="Dataset name, NAME:FOLDER (e.g. textimages:/data/captioned), "
                                       "image folder, or code cache folder."),
    split: Optional[str] = typer.Option(None, "--split", help="Dataset split."),
    image_size: Optional[str] = typer.Option(None, "--image-size",
                                             help="Training image size: S pixels a side, or HxW (e.g. 256x512)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader workers per rank."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch per optimizer step."),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="Micro-steps per optimizer step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate; default 1e-4 * sqrt(B / 768), B the "
                                       "global --batch-size (all ranks and --grad-accum micro-steps): the "
                                       "paper's 1e-4 at batch 768, square-root scaled (2.04e-5 at 32)."),
    lr_end: Optional[float] = typer.Option(None, "--lr-end", help="Final lr of a linear / cosine decay."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="constant | linear | cosine."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    betas: Optional[str] = typer.Option(None, "--betas", help="AdamW betas, e.g. 0.9,0.95."),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="Max gradient norm (0: off)."),
    rollout: Optional[str] = typer.Option(None, "--rollout", autocompletion=_complete.names("rollout"),
                                          help="none | ssr | official (or a plugin's)."),
    ssr_scales: Optional[str] = typer.Option(None, "--ssr-scales", help="all | last | random."),
    ssr_depth: Optional[int] = typer.Option(None, "--ssr-depth", help="SSR stagger steps: d student passes, "
                                            "pass j feeding each scale j-1 own predictions on top of ground truth "
                                            "(1: the paper's one step; > 1 needs --ssr-scales all)."),
    rollout_sampling: Optional[str] = typer.Option(None, "--rollout-sampling", help="argmax | sample."),
    rollout_top_k: Optional[int] = typer.Option(None, "--rollout-top-k"),
    rollout_top_p: Optional[float] = typer.Option(None, "--rollout-top-p"),
    rollout_cfg: Optional[float] = typer.Option(None, "--rollout-cfg", help="Guidance of a sampled rollout."),
    csfl: Optional[str] = typer.Option(None, "--csfl", autocompletion=_complete.names("loss"),
                                       help="hard | soft | naive (or a plugin's)."),
    csfl_temperature: Optional[float] = typer.Option(None, "--csfl-temperature", help="Soft CSFL temperature."),
    gamma: Optional[float] = typer.Option(None, "--gamma", help="CSF loss weight (0.5: what the studies "
                                          "ran; the paper's is 0.01)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing"),
    cond_drop: Optional[float] = typer.Option(None, "--cond-drop", help="Class-dropout probability."),
    null_payload: Optional[List[str]] = typer.Option(
        None, "--null-payload", metavar="NAME=FILE", help="Encoder-derived null payload (features of the empty "
        "prompt) for families that need one: NAME=FILE or FILE (a dict name -> tensor); repeatable; default: "
        "the data's own (textimages: null_payloads.pt)."),
    class_map: Optional[Path] = typer.Option(None, "--class-map", help="Class map file: one class folder a "
                                             "line, optionally with its model label (a subset / mapping)."),
    resize_classes: Optional[bool] = typer.Option(None, "--resize-classes/--no-resize-classes",
                                                  help="Resize the class embedding to the data's class count."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out "
                                "(refused when checkpoints exist but none can be read)."),
    restart: bool = typer.Option(False, "--restart", help="Start over at step 0 in an --out that holds "
                                 "checkpoints: deletes them before step 1 and rewrites metrics.jsonl."),
    accept_data_change: bool = typer.Option(False, "--accept-data-change",
                                            help="With --resume: continue although the data folder's contents "
                                            "changed since the run started (OUT/data.json)."),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay (0: off)."),
    amp: Optional[str] = typer.Option(None, "--amp", help="none | bf16 (CUDA or CPU) | fp16 (CUDA only)."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile each transformer block (dynamic shapes)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Checkpoint every N steps."),
    save_format: Optional[str] = typer.Option(None, "--save-format", help="pt | safetensors: run checkpoints "
                                              "(step_N.pt / .safetensors) and the export (backbone.pth in the "
                                              "upstream layout / a plain backbone.safetensors)."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", help="Checkpoints to keep."),
    log_every: Optional[int] = typer.Option(None, "--log-every"),
    max_nonfinite: Optional[int] = typer.Option(None, "--max-nonfinite",
                                                help="Stop after this many consecutive non-finite steps."),
    loggers: Optional[str] = typer.Option(None, "--loggers", help="Comma list: console, jsonl, tensorboard "
                                          "(extra sar\\[tensorboard]), wandb (extra sar\\[wandb]), a plugin's."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Evaluate every N steps on rank 0: val "
                                             "TF loss, per-scale exposure gap, a sample grid (and FID with "
                                             "--eval-samples) into OUT/eval.jsonl, OUT/eval/, OUT/curves.png (0: off)."),
    eval_at_end: Optional[bool] = typer.Option(None, "--eval-at-end/--no-eval-at-end",
                                               help="Evaluate after the last step."),
    val_data: Optional[str] = typer.Option(None, "--val-data", autocompletion=_complete.datasets,
                                           help="Validation data of the evals (as --data; its split: --set "
                                           "eval.split=...)."),
    eval_images: Optional[int] = typer.Option(None, "--eval-images", help="Size of the fixed validation subset "
                                              "(its first N items)."),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="Samples for FID / precision / "
                                               "recall against the first N validation images at every eval "
                                               "(0: off)."),
    feature_extractor: Optional[str] = typer.Option(None, "--feature-extractor",
                                                    autocompletion=_complete.names("metric"),
                                                    help="Feature extractor of --eval-samples (as sar eval)."),
    feature_weights: Optional[Path] = typer.Option(None, "--feature-weights", help="Local weights of the "
                                                   "feature extractor (inception: torch-fidelity's file)."),
    dist: Optional[str] = typer.Option(None, "--dist", help="ddp | fsdp (under torchrun)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:1 ..."),
    sets: List[str] = typer.Option([], "--set", autocompletion=_complete.set_keys,
                                   help="Override any field: --set optim.hold_fraction=0.05."),
) -> None:
    """Post-train a scale-wise AR model with SAR (or plain teacher forcing: --rollout none).

    Precedence: flag > SAR_* environment variable > --config file > default.

    Exit status: 0 trained; 1 non-finite stop, frozen peer rank or crash; 2 bad input (one line on stderr); 130 Ctrl-C; 143 SIGTERM / SIGUSR1 (checkpoint written: --resume).

    Example: [bold]sar train -f var --tokenizer vae.pth --backbone var_d16.pth --data /data/imagenet/train --image-size 256 --steps 20000 --batch-size 256 --rollout ssr --csfl hard --out runs/sar-var-d16[/]"""
    from sar_core.train.config import ConfigError

    console = Console(soft_wrap=True)  # a warning or error stays one line in logs
    flags = {k: v for k, v in locals().items() if k in FLAG_FIELDS}
    if resume and restart:
        Console(stderr=True).print("[bold red]error:[/] --restart starts over and --resume continues: pass one "
                                   "of them", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    flags["random_tokenizer"] = random_tokenizer or None  # absent: the config file's / run's own
    try:
        cfg = resolve_config(config, collect_overrides(flags, sets), resume, compile_model, accept_data_change)
        if not print_config:
            check_tokenizer(cfg, console)
    except ConfigError as exc:
        Console(stderr=True).print("[bold red]error:[/] " + escape(str(exc)), highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    if print_config:
        typer.echo(cfg.to_yaml(), nl=False)
        return
    raise typer.Exit(run_training(cfg, console, restart=restart))


def check_tokenizer(cfg, console: Console) -> None:
    """A run needs its tokenizer file: a fresh one would train on meaningless codes (loss 19
    instead of 1) and report success. ``--random-tokenizer`` says that is meant."""
    from sar_core.train.config import ConfigError

    if cfg.model.tokenizer is None and not cfg.model.random_tokenizer:
        raise ConfigError("--tokenizer FILE is required: without it the tokenizer would be freshly initialised "
                          "and its codes meaningless (pass --random-tokenizer if that is what you want)")
    if cfg.model.tokenizer is not None and cfg.model.random_tokenizer:
        raise ConfigError("pass either --tokenizer FILE or --random-tokenizer, not both")
    if cfg.model.random_tokenizer:
        console.print("[yellow]warning:[/] --random-tokenizer: training on the codes of a freshly initialised, "
                      "untrained tokenizer", highlight=False)


def run_errors() -> tuple[type[BaseException], ...]:
    """Errors of a training run that mean: fix the input or the machine (exit status 2)."""
    from sar_cli._shared import user_errors
    from sar_core.checkpoint_io import WriteError
    from sar_core.train.resume_check import ResumeMismatch
    from sar_core.train.runlock import RunLockError
    from sar_core.train.trainer import DataReadError

    return (*user_errors(), RunLockError, ResumeMismatch, DataReadError, WriteError)


def _os_error_message(exc: OSError, cfg) -> Optional[str]:
    """One line for a full disk / read-only or forbidden path met outside the atomic writers."""
    import errno

    from sar_core.checkpoint_io import write_error

    where = Path(exc.filename) if exc.filename else Path(cfg.out)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return str(write_error(exc, where))
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{where}: {exc.strerror}; fix its permissions, or choose another --out"
    return None


def run_training(cfg, console: Console, restart: bool = False) -> int:
    """Build the trainer, run it, report; returns the exit status (see the module docstring).
    ``restart``: start over where --out holds checkpoints (``--restart``)."""
    from sar_core.train import distributed as D
    from sar_core.train.signals import EXIT_INTERRUPTED, EXIT_SIGNALLED
    from sar_core.train.checkpointing import exported
    from sar_core.train.config import absolute
    from sar_core.train.runlock import held_run_folder
    from sar_core.train.trainer import Trainer

    err = Console(stderr=True)
    env = None

    def fail(msg: str, code: int) -> int:
        err.print("[bold red]error:[/] " + escape(msg), highlight=False, soft_wrap=True)
        D.cleanup()
        return code

    try:
        env = D.init_distributed(cfg.train.device, cfg.dist.backend, cfg.dist.timeout_s)
        log = console.print if env.is_main else (lambda *a, **k: None)
        out = absolute(cfg.out)
        with held_run_folder(out, out / "checkpoints", env, log):  # first: before model and data are built
            trainer = Trainer(cfg, env=env, log=log, restart=restart, folder_held=True)
            trainer.console = console
            result = trainer.run()
    except run_errors() as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        msg = _os_error_message(exc, cfg)
        if msg is None:
            raise
        return fail(msg, 2)
    except RuntimeError as exc:
        if env is None or not env.enabled or not D.is_peer_timeout(exc):
            raise
        return fail(f"rank {env.rank}: the other ranks did not answer within dist.timeout_s = "
                    f"{cfg.dist.timeout_s:g} s (a peer rank froze or died; see its output); the newest "
                    "checkpoint is kept. If steps are legitimately that slow: --set dist.timeout_s=SECONDS", 1)
    D.cleanup()
    if not env.is_main:
        return {"finished": 0, "signalled": EXIT_SIGNALLED, "interrupted": EXIT_INTERRUPTED}.get(result.status, 1)
    skipped = ""
    if result.skipped:
        skipped = f"{result.skipped} of {result.step} steps skipped (non-finite loss or gradient: no update)"
        if result.skipped_last:
            skipped += f", the last {result.skipped_last} in a row"
    if result.status == "finished":
        done = (f"trained {result.step} steps; backbone written to "
                f"{exported(result.out_dir) or result.out_dir / 'backbone.pth'}; checkpoint {result.checkpoint}")
        if skipped:
            console.print(f"[yellow]warning:[/] {skipped}", highlight=False)
        console.print(done + (f" ({skipped})" if skipped else ""))
        return 0
    if result.status == "nonfinite":
        msg = result.message + (f" ({skipped})" if skipped else "")
        err.print("[bold red]error:[/] " + escape(msg), highlight=False, soft_wrap=True)
        return 1
    err.print(escape(result.message), style="yellow", highlight=False, soft_wrap=True)
    return EXIT_SIGNALLED if result.status == "signalled" else EXIT_INTERRUPTED


def add_to(app: typer.Typer) -> None:
    from sar_cli.train_help import decorate

    app.command("train")(decorate(train, FLAG_FIELDS))
