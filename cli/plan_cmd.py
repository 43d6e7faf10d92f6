"""``sar plan``: memory per GPU, FLOPs and time of a ``sar train`` command, before running it.

It takes every flag of ``sar train`` (paste the command line, replace ``train`` by
``plan``) plus the hardware and the workload; nothing is allocated (the model is built and
stepped on fake tensors, checkpoint files are read for their shapes only). See
:mod:`sar_core.train.plan`.
"""

from __future__ import annotations

import copy
import inspect
import json
import time
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def _plan_options(
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPUs of the run (the torchrun world size)."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="Memory of one GPU in GiB (A100: 40 or 80)."),
    gpu_peak_tflops: float = typer.Option(312.0, "--gpu-peak-tflops",
                                          help="Dense bf16 / fp16 peak of one GPU in TFLOP/s (A100: 312, H100 SXM: 989)."),
    mfu: float = typer.Option(0.4, "--mfu", help="Model FLOPs utilisation assumed for the time estimate (0-1]."),
    headroom: float = typer.Option(0.1, "--headroom", help="Fraction of GPU memory kept free (CUDA context, "
                                   "NCCL, allocator fragmentation)."),
    dataset_size: Optional[int] = typer.Option(None, "--dataset-size", help="Images per epoch (ImageNet-1k "
                                               "train: 1281167) for the GPU-hours estimate."),
    epochs: float = typer.Option(1.0, "--epochs", help="Epochs for the GPU-hours estimate."),
    compare: bool = typer.Option(False, "--compare", help="Also every built-in rollout x checkpointing mode "
                                 "(about 12x the tracing time)."),
    condition_tokens: Optional[int] = typer.Option(None, "--condition-tokens", help="Rows of each variable-length "
                                                   "condition (text tokens; default: the model's maximum)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan as JSON here."),
) -> None:
    """(the plan's own options; merged into the command's signature by add_to)"""


PLAN_PANEL = "Plan: hardware and workload"
#: ``sar train`` flags that mean nothing to a plan
#: the data of a plan without --data: images (a code cache folder plans the step without the encode)
IMAGES = "images"
SKIPPED = ("print_config", "resume", "restart", "accept_data_change")


def plan(**kw) -> None:
    """Plan a `sar train` run: per-GPU memory (weights, gradients, AdamW, EMA, activations), FLOPs per image, the largest micro-batch that fits, step time and GPU hours. Nothing is allocated: the model is built and stepped on fake tensors.

    The data are not read: --data only says whether they are images (the default) or a code cache (no encode). fp16 is planned as bf16 (same sizes). See docs/cluster.md.

    Example: [bold]sar plan -f infinity --set model.overrides.pn=1M --batch-size 64 --rollout ssr --amp bf16 --dist fsdp --gpus 8 --gpu-memory 80 --dataset-size 1000000 --epochs 1[/]"""
    from sar_cli._shared import user_errors
    from sar_cli.train_cmd import FLAG_FIELDS, collect_overrides, resolve_config
    from sar_core.plugins import get_registry
    from sar_core.train.config import ConfigError
    from sar_core.train.plan import Hardware, make_plan

    err = Console(stderr=True, soft_wrap=True)
    console = Console()
    if not console.is_terminal:  # logs and docs: whole tables
        console = Console(width=150)
    t0 = time.perf_counter()
    try:
        flags = {k: v for k, v in kw.items() if k in FLAG_FIELDS}
        overrides = collect_overrides(flags, kw.get("sets") or [])
        if kw.get("config") is None:  # the data are not read: without --data, images are planned
            overrides.setdefault("data.name", IMAGES)
        cfg = resolve_config(kw.get("config"), overrides, False, bool(kw.get("compile_model")))
        hw = Hardware(kw["gpus"], kw["gpu_memory"], kw["gpu_peak_tflops"], kw["mfu"], kw["headroom"])
        with console.status("tracing one training step on fake tensors"):
            result = make_plan(cfg, hw, get_registry(), kw["dataset_size"], kw["epochs"], kw["compare"],
                               kw["condition_tokens"])
    except (ConfigError, *user_errors()) as exc:
        from rich.markup import escape

        err.print("[bold red]error:[/] " + escape(" ".join(str(exc).split())), highlight=False)
        raise typer.Exit(2)
    show(console, result, time.perf_counter() - t0)
    if kw["json_out"] is not None:
        from sar_core.checkpoint_io import atomic_write_text

        atomic_write_text(json.dumps(result.to_dict(), indent=1, default=str), kw["json_out"])


def show(console: Console, p, seconds: float) -> None:
    from sar_core.train.plan import advice

    m, hw = p.model, p.hardware
    img = "x".join(map(str, m["image_size"])) if m["image_size"] else "cached codes"
    console.print(f"[bold]{m['family']}[/]: {m['params'] / 1e6:,.1f}M parameters, {m['depth']} blocks, schedule "
                  f"{m['schedule']} ({m['tokens']} tokens), {img}; amp {p.config['amp']}; {p.strategy} on "
                  f"{hw['gpus']} GPU(s) of {hw['memory_gib']:g} GiB, {hw['peak_tflops']:g} TFLOP/s at "
                  f"{100 * hw['mfu']:.0f}% MFU", highlight=False)
    state = Table(title="state per rank between steps (GiB)", title_justify="left")
    for name in p.state_gib:
        state.add_column(name, justify="right")
    state.add_column("total", justify="right", style="bold")
    state.add_row(*(f"{v:.2f}" for v in p.state_gib.values()), f"{sum(p.state_gib.values()):.2f}")
    console.print(state)
    steps = Table(title=f"one micro-step (micro-batch {p.micro_batch}); time at {100 * hw['mfu']:.0f}% MFU",
                  title_justify="left")
    for col in ("variant", "ckpt", "act. GiB", "GiB/img", "peak in", "max micro", "TFLOP/img", "step s"):
        steps.add_column(col, justify="left" if col in ("variant", "ckpt", "peak in") else "right")
    if p.dataset_size:
        steps.add_column(f"GPU h ({p.epochs:g} ep x {p.dataset_size:,})", justify="right")
    for r in p.rows:
        cells = [r.label, r.ckpt, f"{r.activations_gib:.2f}", f"{r.per_image_gib:.3f}", r.peak_phase,
                 str(r.max_micro_batch), f"{r.flops_per_image / 1e12:.3f}", f"{r.step_s:.2f}"]
        if p.dataset_size:
            cells.append(f"{r.gpu_hours:,.1f}")
        steps.add_row(*cells)
    console.print(steps)
    if p.encode_gib_per_image is not None:
        console.print(f"encode (frozen tokenizer, before the step): {p.encode_gib_per_image:.3f} GiB and "
                      f"{p.encode_flops_per_image / 1e12:.3f} TFLOP per image (in TFLOP/img above)", highlight=False)
    if p.token_scale != 1.0:
        console.print(f"random schedules: memory at the largest ({m['tokens']} tokens), time at the mean "
                      f"({m['mean_tokens']:.0f} tokens, x{p.token_scale:.2f})", highlight=False)
    for line in advice(p):
        console.print(line, highlight=False)
    console.print(f"[dim]traced {p.fake_ops:,} fake ops in {seconds:.1f} s[/]", highlight=False)


def add_to(app: typer.Typer) -> None:
    from sar_cli.train_cmd import FLAG_FIELDS, train
    from sar_cli.train_help import decorate

    decorate(train, FLAG_FIELDS)  # fills panels, shown defaults, help texts
    hints = {**typing.get_type_hints(train), **typing.get_type_hints(_plan_options)}
    params = [p.replace(default=copy.copy(p.default), annotation=hints[n])
              for n, p in inspect.signature(train).parameters.items() if n not in SKIPPED]
    extra = [p.replace(annotation=hints[n]) for n, p in inspect.signature(_plan_options).parameters.items()]
    for p in extra:
        p.default.rich_help_panel = PLAN_PANEL
    plan.__signature__ = inspect.Signature(params + extra)
    app.command("plan")(plan)
