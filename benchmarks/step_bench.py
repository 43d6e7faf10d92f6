"""SAR step cost vs a teacher-forcing step: interleaved rounds, per-round ratios, memory.

    .venv/bin/python benchmarks/step_bench.py                  # both sizes (make bench)
    .venv/bin/python benchmarks/step_bench.py --size tiny --rounds 9 --budget 200

Sizes (random ``var`` models; codes encoded once, the tokenizer is frozen):
  tiny   d6 w384, 6 heads, vocabulary 4096, schedule 1..8 (155 tokens), batch 4
  large  d4 w192, 3 heads, vocabulary 4096, schedule 1..10 (255 tokens), batch 8: a
         longer schedule and a larger batch, so activations outweigh weights + gradients +
         optimizer state as at real batch sizes (kept narrow so a round fits a shared CPU)

A step is what the trainer does per optimizer step: zero grads, ``sar_step`` with the
memory-lean backward, AdamW. Time: median over clean rounds of (variant / TF in the same
round) with a bootstrap 95% interval (``benchmarks/harness.py``: busy rounds are detected
and repeated). Memory (``benchmarks/memory.py``): the step's peak above its start and the
whole-process peak of the training state (weights + gradients + optimizer state + inputs
+ activations), from live tensor storages on CPU, ``max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import run_rounds  # noqa: E402
from benchmarks.memory import measure_step, training_state  # noqa: E402
from sar_core.train.activation_ckpt import apply_activation_checkpointing  # noqa: E402
from sar_core.plugins import get_registry  # noqa: E402
from sar_core.sar.step import sar_step  # noqa: E402

MODEL = dict(depth=6, embed_dim=384, num_heads=6, vocab_size=4096, Cvae=32, ch=32, num_classes=1000,
             drop_path_rate=0.0, cond_drop_rate=0.1)
SIZES = {"tiny": dict(patch_nums=(1, 2, 3, 4, 5, 6, 8), batch=4, model={}),
         "large": dict(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10), batch=8,
                       model=dict(depth=4, embed_dim=192, num_heads=3))}


@dataclass(frozen=True)
class Variant:
    rollout: str
    options: tuple = ()
    ckpt: str = "none"
    loss: str = "hard"


#: the guided official rollout is the official trainer's default (top-k 900, top-p 0.96, cfg 1.2)
VARIANTS = {
    "tf": Variant("none"),
    "ssr-all": Variant("ssr", (("scales", "all"),)),
    "ssr-last": Variant("ssr", (("scales", "last"),)),
    "ssr-last-fullpass": Variant("ssr", (("scales", "last"), ("reuse_prefix", False))),
    "official-argmax": Variant("official", (("sampling", "argmax"),)),
    "official-guided": Variant("official"),
    "official-guided-exact": Variant("official", (("upstream_exact", True),)),
    "tf+selective": Variant("none", ckpt="selective"),
    "ssr-all+selective": Variant("ssr", (("scales", "all"),), ckpt="selective"),
    "ssr-all+full": Variant("ssr", (("scales", "all"),), ckpt="full"),
    "official-guided+selective": Variant("official", ckpt="selective"),
}
DEFAULT = {"tiny": ["tf", "ssr-all", "ssr-last", "official-argmax", "official-guided"],
           "large": ["tf", "ssr-all", "ssr-last", "official-argmax", "official-guided", "tf+selective",
                     "ssr-all+selective"]}
#: measured for memory only (no timed rounds): the reference paths and full checkpointing
MEMORY_ONLY = {"tiny": ["ssr-last-fullpass", "official-guided-exact"],
               "large": ["ssr-last-fullpass", "official-guided-exact", "ssr-all+full",
                         "official-guided+selective"]}


def build(size: str, device: torch.device, seed: int = 0, model: dict | None = None):
    spec = SIZES[size]
    torch.manual_seed(seed)
    cfg = dict(MODEL if model is None else model)
    cfg.update(spec["model"], patch_nums=spec["patch_nums"])
    adapter = get_registry().get("adapter", "var").from_config(cfg).to(device)
    adapter.backbone.train()
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    with torch.no_grad():
        codes = adapter.encode(torch.rand(spec["batch"], 3, h, w, device=device) * 2 - 1, schedule)
    labels = torch.randint(0, cfg["num_classes"], (spec["batch"],), device=device)
    opt = torch.optim.AdamW(adapter.backbone.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.05)
    return adapter, codes, labels, schedule, opt


def make_step(adapter, codes, labels, schedule, opt, variant: Variant, autocast=None):
    reg = get_registry()
    rollout = reg.get("rollout", variant.rollout)(**dict(variant.options))
    loss = reg.get("loss", variant.loss)()
    gen = torch.Generator(device=codes[0].device).manual_seed(0)
    blocks = adapter.transformer_blocks()

    def step():
        apply_activation_checkpointing(blocks, variant.ckpt)
        opt.zero_grad(set_to_none=True)
        with autocast or torch.autocast(codes[0].device.type, enabled=False):
            sar_step(adapter, adapter.backbone, labels, codes, schedule, rollout, loss, gamma=0.01,
                     generator=gen, backward=lambda l: l.backward())
        opt.step()
        if codes[0].device.type == "cuda":
            torch.cuda.synchronize()

    return step


def bench_size(size: str, names: list[str], rounds: int, budget: float, threads: int,
               device: torch.device, log=print, model: dict | None = None,
               memory_only: list[str] = ()) -> dict:
    adapter, codes, labels, schedule, opt = build(size, device, model=model)
    steps = {n: make_step(adapter, codes, labels, schedule, opt, VARIANTS[n])
             for n in list(names) + [m for m in memory_only if m not in names]}
    mem = {}
    for n, s in steps.items():
        s()  # warm-up: gradients and optimizer state exist from here on
        mem[n] = measure_step(s, training_state(adapter.backbone, opt, [codes, labels]), device)
    t0 = time.perf_counter()
    res = run_rounds({n: steps[n] for n in names}, "tf", rounds=rounds, budget_s=budget, threads=threads,
                     log=lambda m: log("  " + m))
    apply_activation_checkpointing(adapter.transformer_blocks(), "none")
    spec = SIZES[size]
    n_params = sum(p.numel() for p in adapter.backbone.parameters())
    return {"size": size, "batch": spec["batch"], "depth": len(adapter.transformer_blocks()),
            "width": adapter.backbone.C, "tokens": schedule.total_tokens, "params": n_params,
            "rounds": res, "memory": mem, "seconds": time.perf_counter() - t0}


def report(r: dict, device: torch.device, threads: int) -> str:
    res, mem = r["rounds"], r["memory"]
    tf = mem["tf"]
    flag = " (busy machine: least-loaded rounds used)" if res.fallback else ""
    lines = [f"size {r['size']}: var d{r['depth']} w{r['width']} ({r['params'] / 1e6:.1f}M params), "
             f"{r['tokens']} tokens, batch {r['batch']}, {device}, {threads} thread(s); {res.clean} clean rounds, "
             f"{res.rejected} busy rounds seen{flag}",
             f"{'variant':<26}{'wall ms':>8}{'x TF':>6}{'95% CI':>14}{'cpu x TF':>9}{'95% CI':>14}"
             f"{'step MiB':>9}{'x TF':>6}{'proc MiB':>9}{'x TF':>6}"]
    for n in mem:
        m = mem[n]
        if n in res.times:
            t, q, c = res.time_summary(n), res.summary(n), res.cpu_summary(n)
            timing = (f"{1e3 * t.median:>8.0f}{q.median:>6.2f}{f'[{q.lo:.2f}, {q.hi:.2f}]':>14}"
                      f"{c.median:>9.2f}{f'[{c.lo:.2f}, {c.hi:.2f}]':>14}")
        else:
            timing = f"{'(memory only)':>51}"
        lines.append(f"{n:<26}{timing}{m.step_peak / 2 ** 20:>9.1f}{m.step_peak / tf.step_peak:>6.2f}"
                     f"{m.process_peak / 2 ** 20:>9.1f}{m.process_peak / tf.process_peak:>6.2f}")
    lines.append(f"  resident training state (weights + grads + AdamW + inputs): {tf.resident / 2 ** 20:.1f} MiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", action="append", choices=list(SIZES), help="tiny and/or large (default both)")
    ap.add_argument("--variants", default=None, help=f"comma list from: {', '.join(VARIANTS)}")
    ap.add_argument("--rounds", type=int, default=7, help="clean rounds wanted per size")
    ap.add_argument("--budget", type=float, default=140.0, help="seconds of timed rounds per size at most")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to a busy box)")
    ap.add_argument("--quiet", action="store_true", help="no per-round lines")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = None
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        bad = [v for v in names if v not in VARIANTS]
        if bad:
            print(f"error: unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
            return 2
        names = ["tf"] + [n for n in names if n != "tf"]
    for size in args.size or ["tiny", "large"]:
        print(f"== {size}", flush=True)
        r = bench_size(size, names or DEFAULT[size], args.rounds, args.budget, args.threads, device,
                       log=(lambda m: None) if args.quiet else (lambda m: print(m, flush=True)),
                       memory_only=[] if names else MEMORY_ONLY[size])
        print(report(r, device, args.threads), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
