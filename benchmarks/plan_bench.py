"""``sar plan``'s memory estimate against the step benchmark's measured peak, and its FLOPs
against a real step's.

    .venv/bin/python benchmarks/plan_bench.py                # step_bench's tiny and large sizes
    .venv/bin/python benchmarks/plan_bench.py --size tiny --variants tf,ssr-all

For each size and variant of ``benchmarks/step_bench.py`` (random ``var`` models, codes
encoded once, AdamW): the measured whole-process peak of one step
(``benchmarks/memory.py``: weights + gradients + AdamW + inputs + activations, live tensor
storages on CPU) and the plan's estimate of the same (its state + activations at the
bench's micro-batch, from traces at 1 and 2 blocks x micro-batch 1 and 2 on fake tensors),
with the error in percent; and the FLOPs of the real step (the plan's formulas, counted op by
op) against the plan's extrapolation. ``tests/test_plan.py`` asserts the same within 20% at a smaller
size.

    .venv/bin/python benchmarks/plan_bench.py --real-size    # sar plan of Infinity-8B: time and RSS

``--real-size``: ``sar plan`` of Infinity-8B (8.4 B parameters, 1024 px, FSDP2 on 8 GPUs) in a
fresh process, its wall time (goal: under a minute) and peak RSS against the 31 GiB its
float32 weights alone would take (goal: a small fraction: nothing is allocated).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.memory import measure_step, training_state  # noqa: E402
from benchmarks.step_bench import MODEL, SIZES, VARIANTS, build, make_step  # noqa: E402
from sar_core.plugins import get_registry  # noqa: E402
from sar_core.train.config import build_config  # noqa: E402
from sar_core.train.plan import state_bytes  # noqa: E402
from sar_core.train.fake_trace import op_flops  # noqa: E402
from sar_core.train.plan_trace import Variant, trace_run  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


#: Infinity-8B as released (shared/reference/infinity.md: depth 40, width 3584, 28 heads,
#: the d56 f8 tokenizer: 14 bits x 2x2 spatial patchify), 1024 px
INFINITY_8B = {"pn": "1M", "spatial_patchify": True,
               "tokenizer": {"codebook_dim": 14, "patch_size": 8, "ch_mult": [1, 2, 4, 4]},
               "backbone": {"depth": 40, "embed_dim": 3584, "num_heads": 28}}


def plan_variant(name: str) -> Variant:
    v = VARIANTS[name]
    return Variant(name, v.rollout, tuple(sorted(v.options)), v.ckpt)


def compare(model: dict, patch_nums, batch: int, names: list[str], log=print) -> list[dict]:
    """Measured vs planned process peak (bytes) and FLOPs per variant, one real step each."""
    cfg_model = dict(model, patch_nums=tuple(patch_nums))
    adapter, codes, labels, schedule, opt = build_from(cfg_model, batch)
    measured = {}
    for n in names:
        step = make_step(adapter, codes, labels, schedule, opt, VARIANTS[n])
        step()  # gradients and AdamW state exist from here on, as in the bench
        mem = measure_step(step, training_state(adapter.backbone, opt, [codes, labels]), torch.device("cpu"))
        counter = _Flops()
        with counter:
            step()
        measured[n] = (mem.process_peak, counter.flops)
    cfg = build_config({"model": {"family": "var", "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                                  for k, v in cfg_model.items()}},
                        "data": {"name": "digits"}, "train": {"batch_size": batch}})
    t0 = time.perf_counter()
    traced = trace_run(cfg, [plan_variant(n) for n in names], get_registry(), images=False)
    log(f"  traced {traced.fake_ops} fake ops in {time.perf_counter() - t0:.1f} s")
    state = state_bytes(traced, "ddp", 1, ema=False)
    resident = state["weights"] + state["AdamW moments"] + state["buffers"]  # gradients: in the traced step
    out = []
    for s, n in zip(traced.steps, names):
        planned = resident + s.peak(batch)
        peak, flops = measured[n]
        out.append({"variant": n, "measured": peak, "planned": planned, "error": planned / peak - 1,
                    "measured_flops": flops, "planned_flops": s.flops.at(batch)})
    return out


class _Flops(TorchDispatchMode):
    """The plan's FLOP formulas (``fake_trace.op_flops``) summed over a real step."""

    flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.flops += op_flops(func, args, kwargs or {}, out)
        return out


def build_from(model: dict, batch: int):
    """step_bench.build for an explicit model config and batch."""
    from sar_core.plugins import get_registry as reg

    torch.manual_seed(0)
    adapter = reg().get("adapter", "var").from_config(model)
    adapter.backbone.train()
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    with torch.no_grad():
        codes = adapter.encode(torch.rand(batch, 3, h, w) * 2 - 1, schedule)
    labels = torch.randint(0, model["num_classes"], (batch,))
    opt = torch.optim.AdamW(adapter.backbone.parameters(), lr=1e-6, betas=(0.9, 0.95), weight_decay=0.05)
    return adapter, codes, labels, schedule, opt


def real_size(limit_s: float = 60.0) -> int:
    """``sar plan`` of Infinity-8B in a child process: wall time and peak RSS vs its weights."""
    import json
    import resource
    import subprocess
    import tempfile

    sar = Path(sys.executable).with_name("sar")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [str(sar), "plan", "-f", "infinity", "--set", f"model.overrides={json.dumps(INFINITY_8B)}",
               "--data", "images", "--batch-size", "64", "--rollout", "ssr", "--amp", "bf16", "--dist", "fsdp",
               "--gpus", "8", "--gpu-memory", "80", "--json", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        plan = json.loads(out.read_text())
    weights = plan["model"]["param_bytes"]
    print(f"sar plan of Infinity-8B ({plan['model']['params'] / 1e9:.2f} B parameters): {wall:.1f} s wall, "
          f"peak RSS {rss / 2 ** 30:.2f} GiB = {rss / weights:.3f} x its float32 weights ({weights / 2 ** 30:.1f} GiB)")
    ok = wall < limit_s and rss < 0.1 * weights
    print("goal (< 60 s, RSS < 0.1 x the weights): " + ("met" if ok else "MISSED"))
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", action="append", choices=list(SIZES), help="tiny and/or large (default both)")
    ap.add_argument("--variants", default="tf,ssr-all,ssr-last,official-guided,tf+selective,ssr-all+selective,"
                    "ssr-all+full", help=f"comma list from: {', '.join(VARIANTS)}")
    ap.add_argument("--real-size", action="store_true", help="only: sar plan of Infinity-8B, time and peak RSS")
    args = ap.parse_args(argv)
    if args.real_size:
        return real_size()
    torch.set_num_threads(1)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        print(f"error: unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    worst = 0.0
    for size in args.size or ["tiny", "large"]:
        spec = SIZES[size]
        model = dict(MODEL, **spec["model"])
        print(f"== {size}: var d{model['depth']} w{model['embed_dim']}, patch_nums {spec['patch_nums']}, "
              f"batch {spec['batch']}", flush=True)
        rows = compare(model, spec["patch_nums"], spec["batch"], names)
        print(f"{'variant':<20}{'measured MiB':>14}{'planned MiB':>13}{'error':>8}{'GFLOP meas.':>13}"
              f"{'GFLOP plan':>12}")
        for r in rows:
            worst = max(worst, abs(r["error"]))
            print(f"{r['variant']:<20}{r['measured'] / 2 ** 20:>14.1f}{r['planned'] / 2 ** 20:>13.1f}"
                  f"{100 * r['error']:>+7.1f}%{r['measured_flops'] / 1e9:>13.2f}{r['planned_flops'] / 1e9:>12.2f}",
                  flush=True)
    print(f"largest memory error: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
