"""GPU readiness: bf16 training steps and samplers of a VAR-d16-sized random model.

    bash benchmarks/gpu.sh                 # one GPU, under 5 minutes
    bash benchmarks/gpu.sh --dry-run       # CPU, tiny sizes, a few steps (the test suite runs this)

Training: teacher forcing, SSR (all scales) and the official guided rollout, each a full
optimizer step (``sar_step`` with the memory-lean backward + AdamW) under bf16 autocast,
eager and with ``torch.compile`` of every transformer block (``Module.compile``: state
dict names unchanged). Attention is restricted to fused SDPA kernels (flash /
memory-efficient / cuDNN; no math fallback) when CUDA is present. Sampling: the family's
KV-cached guided sampler at batch 64, eager, compiled, and compiled with CUDA graphs
(``mode='reduce-overhead'``).

Printed per line: images/s, MFU (matmul + attention FLOPs of the measured step, counted
with ``torch.utils.flop_counter``, over the device's bf16 dense peak; ``--peak-tflops``
overrides the table), peak memory (``torch.cuda.max_memory_allocated``). A variant that
fails (e.g. a compile error) prints its error and the script goes on.
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
    for block in adapter.transformer_blocks():
        block.compile(mode=mode) if mode else block.compile()


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
         mem: float) -> dict:
    ips = batch / sec
    mfu = flops / sec / peak if peak else float("nan")
    print(f"{kind:<7}{name:<17}{mode:<11}{ips:>10.1f} img/s{100 * mfu:>8.1f}% MFU{mem:>9.2f} GiB peak", flush=True)
    return {"kind": kind, "variant": name, "mode": mode, "img_per_s": ips, "mfu": mfu, "peak_gib": mem,
            "step_s": sec, "flops": flops}


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
                    "(default: all on CUDA, eager in a dry run)")
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
    modes = (args.modes or ("eager,compile,cudagraphs" if cuda else "eager")).split(",")
    bad = [m for m in modes if m not in ("eager", "compile", "cudagraphs")]
    if bad:
        print(f"error: unknown mode(s) {', '.join(bad)}; use eager, compile, cudagraphs", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    amp = torch.bfloat16
    results = []
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu (dry run)'}; model depth {cfg['depth']} "
          f"width {cfg['embed_dim']}, schedule {cfg['patch_nums']}, bf16 autocast; peak "
          f"{peak / 1e12 if peak else float('nan'):.0f} TFLOP/s", flush=True)
    for mode in (m for m in modes if m != "cudagraphs"):  # training: eager and compiled
        adapter, codes, labels, schedule = build(cfg, device, batch)
        adapter.backbone.train()
        if mode == "compile":
            compile_blocks(adapter, None)
        opt = torch.optim.AdamW(adapter.backbone.parameters(), lr=1e-5, fused=cuda)
        for variant in TRAIN:
            def run(variant=variant):
                step = train_step(adapter, codes, labels, schedule, opt, variant, amp)
                reset_peak(device)
                sec, flops = timed(step, device, steps, warmup=2 if mode == "eager" else 3)
                return line("train", variant, mode, batch, sec, flops, peak, peak_gib(device))
            results.append(guarded("train", variant, mode, run))
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
            reset_peak(device)
            sec, flops = timed(sample, device, steps, warmup=1 if mode == "eager" else 2)
            return line("sample", "var-guided", mode, sample_batch, sec, flops, peak, peak_gib(device))
        results.append(guarded("sample", "var-guided", mode, run))
        del adapter
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
