"""GPU readiness: bf16 training steps and samplers of a VAR-d16-sized random model.

    bash benchmarks/gpu.sh                 # one GPU, under 5 minutes
    bash benchmarks/gpu.sh --dry-run       # CPU, tiny sizes, every variant incl. compiled (tests: eager)

Training: teacher forcing, SSR (all scales) and the official guided rollout, each a full
optimizer step (``sar_step`` with the memory-lean backward + AdamW) under bf16 autocast,
eager and with ``torch.compile`` of every transformer block (``Module.compile``: state
dict names unchanged). Attention is restricted to fused SDPA kernels (flash /
memory-efficient / cuDNN; no math fallback) when CUDA is present. Sampling: the family's
KV-cached guided sampler at batch 64, eager, compiled, and compiled with CUDA graphs
(``mode='reduce-overhead'``).

Printed per line: images/s, MFU (matmul + attention FLOPs of the measured step, counted
with ``torch.utils.flop_counter``, over the device's bf16 dense peak; ``--peak-tflops``
overrides the table), peak memory (``torch.cuda.max_memory_allocated``; in a dry run the
live tensor bytes of ``benchmarks/memory.py``, eager steps only). A variant that fails
(e.g. a compile error) prints its error and the script goes on.

The dry run (CPU, tiny model) runs the same variants, compiled ones included (inductor on
the CPU; CUDA graphs need CUDA), so the script is known to run before a GPU is lent.
Training is compiled as ``sar train --compile`` compiles it
(``sar_core.train.compiling.compile_blocks``: every block, dynamic shapes); each row
counts the graphs it compiled. ``--json FILE`` writes ONE file, rewritten after every
row (a run cut short by the time limit keeps what it measured), schema ``SCHEMA``:
``device``, ``dry_run``, ``torch``, ``model`` (the config), ``batch``, ``amp``,
``peak_tflops``, ``plan`` (what ``sar plan``'s engine predicts for each training variant
of this model and batch, traced on fake tensors before the first step: ``peak_gib``
whole-process, ``flops`` per step) and ``results`` (one row per variant x mode; training
rows carry ``planned_peak_gib`` / ``planned_flops``, ``peak_error`` (plan vs measured
peak), ``formula_flops`` (eager: the step's FLOPs by the plan's per-op formulas) and
``flops_error`` (plan vs those), and the measured ``mfu``, the value to give
``sar plan --mfu``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sar_core.plugins import get_registry  # noqa: E402
from sar_core.sar.step import sar_step  # noqa: E402

D16 = dict(depth=16, embed_dim=1024, num_heads=16, vocab_size=4096, Cvae=32, ch=160, num_classes=1000,
           patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), drop_path_rate=0.0, cond_drop_rate=0.1)
TINY = dict(depth=2, embed_dim=64, num_heads=2, vocab_size=64, Cvae=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
            num_classes=10, patch_nums=(1, 2, 3, 4), drop_path_rate=0.0, cond_drop_rate=0.1)
#: bf16 dense peak TFLOP/s by device-name fragment
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0,
               "4090": 165.0, "3090": 71.0}
TRAIN = {"tf": ("none", {}), "ssr-all": ("ssr", {"scales": "all"}), "official-guided": ("official", {})}
SCHEMA = "sar-gpu-bench/2"
GIB = 2 ** 30


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), None)


def sdpa_context(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def compile_blocks(adapter, mode: str | None) -> None:
    """Samplers: every block, with ``mode`` (``reduce-overhead``: CUDA graphs)."""
    for block in adapter.transformer_blocks():
        block.compile(mode=mode) if mode else block.compile()


def plan_of(cfg: dict, batch: int, cuda: bool) -> dict:
    """``sar plan``'s prediction for each training variant: whole-process peak (weights,
    AdamW moments, buffers, the tokenizer where it sits on the measured device, the step's
    codes, labels, gradients and activations) and FLOPs of one step (fake tensors)."""
    from sar_core.train.config import build_config
    from sar_core.train.plan import state_bytes
    from sar_core.train.plan_trace import Variant, trace_run

    run = build_config({"model": {"family": "var", "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in cfg.items()}},
                        "data": {"name": "codes"}, "train": {"batch_size": batch, "amp": "bf16"}})
    variants = [Variant(n, r, tuple(sorted(o.items()))) for n, (r, o) in TRAIN.items()]
    traced = trace_run(run, variants, get_registry(), images=False, grads_in_step=True)
    state = state_bytes(traced, "ddp", 1, ema=False)
    resident = state["weights"] + state["AdamW moments"] + state["buffers"]
    if cuda:  # the measured device holds the tokenizer too (max_memory_allocated sees it)
        resident += state["tokenizer (frozen)"]
    return {s.variant.label: {"peak_gib": (resident + s.peak(batch)) / GIB, "flops": s.flops.at(batch)}
            for s in traced.steps}


def with_plan(row: dict, plan: dict) -> dict:
    """A training row with the plan's figures and the plan's relative errors."""
    p = plan.get(row.get("variant"))
    if row.get("kind") != "train" or p is None or "error" in row:
        return row
    row = dict(row, planned_peak_gib=p["peak_gib"], planned_flops=p["flops"])
    if row.get("formula_flops"):
        row["flops_error"] = p["flops"] / row["formula_flops"] - 1
    if row.get("peak_gib") is not None and row["peak_gib"] == row["peak_gib"]:  # not NaN
        row["peak_error"] = p["peak_gib"] / row["peak_gib"] - 1
    return row


def timed(fn, device, steps: int, warmup: int) -> tuple[float, float]:
    """Seconds per call (median of ``steps``) after ``warmup`` calls, and the call's flops."""
    from torch.utils.flop_counter import FlopCounterMode

    for _ in range(warmup):
        fn()
    sync(device)
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], float(counter.get_total_flops())


def build(cfg: dict, device: torch.device, batch: int, seed: int = 0):
    torch.manual_seed(seed)
    adapter = get_registry().get("adapter", "var").from_config(cfg).to(device)
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    with torch.no_grad():
        codes = adapter.encode(torch.rand(batch, 3, h, w, device=device) * 2 - 1, schedule)
    labels = torch.randint(0, cfg["num_classes"], (batch,), device=device)
    return adapter, codes, labels, schedule


def train_step(adapter, codes, labels, schedule, opt, variant: str, amp: torch.dtype | None):
    reg = get_registry()
    name, options = TRAIN[variant]
    rollout, loss = reg.get("rollout", name)(**options), reg.get("loss", "hard")()
    dev = codes[0].device
    gen = torch.Generator(device=dev).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None), sdpa_context(dev):
            sar_step(adapter, adapter.backbone, labels, codes, schedule, rollout, loss, gamma=0.01,
                     generator=gen, backward=lambda l: l.backward())
        opt.step()

    return step


def line(kind: str, name: str, mode: str, batch: int, sec: float, flops: float, peak: float | None,
         mem: float | None, graphs: int = 0) -> dict:
    ips = batch / sec
    mfu = flops / sec / peak if peak else None
    shown = f"{100 * mfu:>8.1f}% MFU" if mfu is not None else f"{'-':>8}  MFU"
    shown += f"{mem:>9.3f} GiB peak" if mem is not None else f"{'-':>9} GiB peak"
    print(f"{kind:<7}{name:<17}{mode:<11}{ips:>10.1f} img/s{shown}{graphs:>4} graphs", flush=True)
    return {"kind": kind, "variant": name, "mode": mode, "img_per_s": ips, "mfu": mfu, "peak_gib": mem,
            "step_s": sec, "flops": flops, "compiled_graphs": graphs}


def guarded(kind, name, mode, fn):
    try:
        return fn()
    except Exception as exc:  # a compile failure must not hide the other figures
        print(f"{kind:<7}{name:<17}{mode:<11} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
              flush=True)
        return {"kind": kind, "variant": name, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:500]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps: checks the paths only")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 32; dry run 2)")
    ap.add_argument("--sample-batch", type=int, default=None, help="sampler batch (default 64; dry run 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed calls per variant (default 5; dry run 1)")
    ap.add_argument("--modes", default=None, help="comma list of eager, compile, cudagraphs "
                    "(default: all on CUDA, eager and compile in a dry run)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device for MFU")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("error: no CUDA device; run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    cfg = D16 if cuda else TINY
    batch = args.batch or (32 if cuda else 2)
    sample_batch = args.sample_batch or (64 if cuda else 2)
    steps = args.steps or (5 if cuda else 1)
    modes = (args.modes or default_modes(cuda)).split(",")
    bad = [m for m in modes if m not in ("eager", "compile", "cudagraphs")]
    if bad:
        print(f"error: unknown mode(s) {', '.join(bad)}; use eager, compile, cudagraphs", file=sys.stderr)
        return 2
    if "cudagraphs" in modes and not cuda:
        print("error: mode cudagraphs needs CUDA; a dry run takes --modes eager,compile", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    amp = torch.bfloat16
    results = []
    report = {"schema": SCHEMA, "device": torch.cuda.get_device_name(device) if cuda else "cpu (dry run)",
              "dry_run": not cuda, "torch": torch.__version__, "model": {k: list(v) if isinstance(v, tuple) else v
                                                                         for k, v in cfg.items()},
              "batch": batch, "sample_batch": sample_batch, "amp": "bf16",
              "peak_tflops": peak / 1e12 if peak else None, "plan": {}, "results": results}

    def record(row: dict) -> None:
        results.append(with_plan(row, report["plan"]))
        if args.json:
            from sar_core.checkpoint_io import atomic_write_text

            atomic_write_text(json.dumps(report, indent=1), args.json)

    try:
        report["plan"] = plan_of(cfg, batch, cuda)
    except Exception as exc:  # the measurements are worth having without the plan
        report["plan_error"] = f"{type(exc).__name__}: {exc}"[:500]
        print(f"plan failed: {report['plan_error']}", flush=True)
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu (dry run)'}; model depth {cfg['depth']} "
          f"width {cfg['embed_dim']}, schedule {cfg['patch_nums']}, bf16 autocast; peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
    from sar_core.train.compiling import compile_blocks as compile_training, compiled_graphs

    for mode in (m for m in modes if m != "cudagraphs"):  # training: eager and compiled
        adapter, codes, labels, schedule = build(cfg, device, batch)
        adapter.backbone.train()
        if mode == "compile":
            compile_training(adapter.transformer_blocks(), adapter.backbone)
        opt = torch.optim.AdamW(adapter.backbone.parameters(), lr=1e-5, fused=cuda)
        for variant in TRAIN:
            def run(variant=variant):
                step = train_step(adapter, codes, labels, schedule, opt, variant, amp)
                graphs = compiled_graphs()
                reset_peak(device)
                sec, flops = timed(step, device, steps, warmup=2 if mode == "eager" else 3)
                mem = peak_gib(device) if cuda else cpu_peak_gib(step, adapter, opt, codes, labels, mode)
                row = line("train", variant, mode, batch, sec, flops, peak, mem, compiled_graphs() - graphs)
                return dict(row, formula_flops=formula_flops(step) if mode == "eager" else None)
            record(guarded("train", variant, mode, run))
        del adapter, opt
    for mode in modes:  # samplers
        adapter, _, labels, schedule = build(cfg, device, 1)
        labels = torch.randint(0, cfg["num_classes"], (sample_batch,), device=device)
        if mode != "eager":
            compile_blocks(adapter, "reduce-overhead" if mode == "cudagraphs" else None)

        def sample(adapter=adapter, labels=labels, schedule=schedule):
            with torch.no_grad(), adapter.inference(), torch.autocast(device.type, dtype=amp), sdpa_context(device):
                adapter.generate(labels, schedule, cfg=1.5, top_k=900, top_p=0.96,
                                 generator=torch.Generator(device=device).manual_seed(0))

        def run(mode=mode, sample=sample):
            graphs = compiled_graphs()
            reset_peak(device)
            sec, flops = timed(sample, device, steps, warmup=1 if mode == "eager" else 2)
            return line("sample", "var-guided", mode, sample_batch, sec, flops, peak,
                        peak_gib(device) if cuda else None, compiled_graphs() - graphs)
        record(guarded("sample", "var-guided", mode, run))
        del adapter
    return 1 if all("error" in r for r in results) else 0


def formula_flops(step) -> float:
    """FLOPs of one more step by ``sar plan``'s own per-op formulas (``fake_trace.op_flops``),
    so that ``flops_error`` is the plan's extrapolation error alone: torch's FlopCounterMode
    (``flops``, the MFU basis) skips the CPU flash-attention kernels, the plan counts them."""
    from benchmarks.plan_bench import _Flops

    counter = _Flops()
    with counter:
        step()
    return float(counter.flops)


def default_modes(cuda: bool) -> str:
    """Every mode on CUDA; in a dry run eager and compiled (CUDA graphs need CUDA)."""
    return "eager,compile,cudagraphs" if cuda else "eager,compile"


def cpu_peak_gib(step, adapter, opt, codes, labels, mode: str) -> float | None:
    """Whole-process peak of one more step in live tensor bytes (eager only: a dispatch mode
    around compiled code would measure something else)."""
    if mode != "eager":
        return None
    from benchmarks.memory import measure_step, training_state

    return measure_step(step, training_state(adapter.backbone, opt, [codes, labels]),
                        torch.device("cpu")).process_peak / GIB


if __name__ == "__main__":
    sys.exit(main())
