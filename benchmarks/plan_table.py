"""The ``sar plan`` tables of docs/cluster.md: released model sizes on 8 x 40 / 80 GB A100s.

    .venv/bin/python benchmarks/plan_table.py                          # print the tables (markdown)
    .venv/bin/python benchmarks/plan_table.py --check docs/cluster.md  # exit 1 if the docs differ

Each model (random weights of the released size, built on fake tensors: nothing is
allocated) is planned as ``sar plan`` plans it: the SSR step of sar's defaults
(``--rollout ssr --ssr-scales all --csfl hard``) under bf16 autocast on 8 GPUs, under each
activation-checkpointing mode, once as DDP and once as FSDP2 (``--dist ddp|fsdp``): memory
per image (of the FSDP2 trace, whose gradients exist before the step: activations alone), FLOPs per image (tokenizer encode included), state per rank and the largest
micro-batch at 40 and 80 GiB (10% headroom), and GPU hours per epoch at 40% MFU of
312 TFLOP/s. The second table is the choice :func:`choose` makes from the first. About
5-10 minutes on 2 busy cores (10 traces; the model is built once per strategy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.plan_bench import INFINITY_8B  # noqa: E402
from sar_core.plugins import get_registry  # noqa: E402
from sar_core.train.config import build_config  # noqa: E402
from sar_core.train.plan import CKPT_MODES, Hardware, make_plan  # noqa: E402
from sar_core.train.plan_trace import Variant, trace_run  # noqa: E402

IMAGENET = 1_281_167
GPUS, MEMORIES, MFU, PEAK = 8, (40, 80), 0.4, 312.0
BEGIN, END = "<!-- plan_table.py: begin -->", "<!-- plan_table.py: end -->"
#: label -> (family, model overrides, image size, schedule, global batch, images per epoch)
MODELS = {
    "VAR-d16, 256 px": ("var", {"depth": 16, "embed_dim": 1024, "num_heads": 16}, None, None, 256, IMAGENET),
    "VAR-d30, 256 px": ("var", {"depth": 30, "embed_dim": 1920, "num_heads": 30}, None, None, 256, IMAGENET),
    "FlexVAR-d24, 512 px crops, random schedules": ("flexvar", {"backbone": {"depth": 24}}, 512, "flexvar-random",
                                                    768, IMAGENET),
    "Infinity-2B, 1024 px (pn 1M)": ("infinity", {"pn": "1M"}, None, None, 64, 1_000_000),
    "Infinity-8B, 1024 px (pn 1M)": ("infinity", INFINITY_8B, None, None, 64, 1_000_000),
}


def config(family: str, overrides: dict, image_size, schedule, batch: int, strategy: str):
    data = {"name": "images", **({"image_size": image_size} if image_size else {})}
    model = {"family": family, "overrides": overrides, **({"schedule": schedule} if schedule else {})}
    return build_config({"model": model, "data": data, "rollout": {"name": "ssr", "scales": "all"},
                         "dist": {"strategy": strategy}, "train": {"batch_size": batch, "amp": "bf16"}})


def plans(label: str, reg) -> dict:
    """(strategy, ckpt, GiB) -> Plan of one model."""
    family, overrides, size, schedule, batch, epoch = MODELS[label]
    out = {}
    for strategy in ("ddp", "fsdp"):
        cfg = config(family, overrides, size, schedule, batch, strategy)
        own = [Variant(f"ssr {c}", "ssr", (("scales", "all"),), c) for c in CKPT_MODES]
        traced = trace_run(cfg, own, reg, grads_in_step=strategy == "ddp")
        for i, ckpt in enumerate(CKPT_MODES):
            one = type(traced)(traced.facts, [traced.steps[i]], traced.encode, traced.grads_in_step, traced.fake_ops)
            for mem in MEMORIES:
                out[(strategy, ckpt, mem)] = make_plan(cfg, Hardware(GPUS, mem, PEAK, MFU, 0.1), reg, epoch, 1.0,
                                                       traced=one)
    return out


def choose(p: dict, mem: int) -> tuple[str, str, int, int]:
    """(strategy, ckpt, micro-batch, grad-accum) for one GPU memory: the checkpointing mode
    that recomputes least (none, then selective, then full) under which some strategy fits an
    image; DDP (no all-gathers) unless FSDP2 fits a larger micro-batch where DDP's is below
    the per-rank batch; the largest micro-batch up to the per-rank batch that divides it."""
    for ckpt in CKPT_MODES:
        fits = {s: p[(s, ckpt, mem)].rows[0].max_micro_batch for s in ("ddp", "fsdp")}
        if max(fits.values()) < 1:
            continue
        per_rank = p[("ddp", ckpt, mem)].config["batch_size"] // GPUS
        strategy = "ddp" if fits["ddp"] >= min(per_rank, fits["fsdp"]) else "fsdp"
        micro = min(per_rank, fits[strategy])
        while per_rank % micro:
            micro -= 1
        return strategy, ckpt, micro, per_rank // micro
    return "-", "-", 0, 0


def table(reg, log=print, only: str = "") -> list[str]:
    lines = [f"Per GPU of {GPUS}, SSR step (all scales), bf16. State: weights, gradients, AdamW, buffers, "
             "frozen tokenizer (+ DDP buckets / FSDP2 unsharded blocks).", "",
             "| model | params | ckpt | GiB / image | TFLOP / image | DDP state GiB | DDP max micro-batch 40 / 80 GB "
             "| FSDP2 state GiB | FSDP2 max micro-batch 40 / 80 GB | GPU h / epoch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    chosen = ["", f"Which to choose (`benchmarks/plan_table.py` `choose`), global batch as given, {GPUS} GPUs, "
              f"{100 * MFU:.0f}% MFU:", "",
              "| model | global batch | GPU | strategy | activation checkpointing | micro-batch x grad-accum | "
              "GPU h / epoch | epoch wall-clock h |", "|---|---|---|---|---|---|---|---|"]
    for label, (_, _, _, _, batch, epoch) in MODELS.items():
        if only not in label:
            continue
        t0 = time.perf_counter()
        p = plans(label, reg)
        for ckpt in CKPT_MODES:
            ddp, fsdp = p[("ddp", ckpt, 80)], p[("fsdp", ckpt, 80)]
            row = ddp.rows[0]
            micro = " / ".join(str(p[("ddp", ckpt, m)].rows[0].max_micro_batch) for m in MEMORIES)
            fmicro = " / ".join(str(p[("fsdp", ckpt, m)].rows[0].max_micro_batch) for m in MEMORIES)
            lines.append(f"| {label} | {ddp.model['params'] / 1e9:.2f} B | {ckpt} | {fsdp.rows[0].per_image_gib:.2f} | "
                         f"{row.flops_per_image / 1e12:.2f} | {sum(ddp.state_gib.values()):.1f} | {micro} | "
                         f"{sum(fsdp.state_gib.values()):.1f} | {fmicro} | {row.gpu_hours:,.0f} |")
        for mem in MEMORIES:
            strategy, ckpt, micro, accum = choose(p, mem)
            if not micro:
                chosen.append(f"| {label} | {batch} | A100 {mem} GB | does not fit on {GPUS} GPUs | | | | |")
                continue
            hours = p[(strategy, ckpt, mem)].rows[0].gpu_hours
            name = {"ddp": "DDP", "fsdp": "FSDP2 (`--dist fsdp`)"}[strategy]
            chosen.append(f"| {label} | {batch} | A100 {mem} GB | {name} | {ckpt} | {micro} x {accum} | "
                          f"{hours:,.0f} | {hours / GPUS:,.1f} |")
        log(f"  {label}: {time.perf_counter() - t0:.0f} s")
    return lines + chosen + ["", f"Epoch: {IMAGENET:,} images (ImageNet-1k train) for VAR / FlexVAR, 1,000,000 "
                             "for Infinity. GPU hours at 40% MFU scale as 0.4 / MFU (`sar plan --mfu`)."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", type=Path, help="compare with the table between the markers of this file")
    ap.add_argument("--only", default="", help="only the models whose label contains this (quick looks)")
    args = ap.parse_args(argv)
    lines = table(get_registry(), log=lambda m: print(m, file=sys.stderr, flush=True), only=args.only)
    if args.check is None:
        print("\n".join(lines))
        return 0
    text = args.check.read_text()
    if BEGIN not in text or END not in text:
        print(f"error: {args.check} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    inside = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n").splitlines()
    if inside == lines:
        print(f"{args.check}: the table equals what the script prints")
        return 0
    diff = [f"  docs: {a}\n  now:  {b}" for a, b in zip(inside + [""] * len(lines), lines + [""] * len(inside))
            if a != b]
    print(f"{args.check}: the table differs from what the script prints:\n" + "\n".join(diff[:10]))
    return 1


if __name__ == "__main__":
    sys.exit(main())
