"""Step time and peak memory: a teacher-forcing step vs SAR steps (not part of the tests).

    .venv/bin/pytest benchmarks/test_step_bench.py            # CPU here, CUDA when available
    SAR_BENCH_AMP=bf16 .venv/bin/pytest benchmarks/           # autocast on CUDA

Model: the ``var`` adapter built from a config (depth 6, width 384, 6 heads, schedule
1,2,3,4,5,6,8 = 155 tokens, vocabulary 4096, small tokenizer), batch 4, class-conditional.
A step is what the trainer does per optimizer step: zero grads, ``sar_step`` with the
memory-lean backward, AdamW. Codes are encoded once beforehand (the tokenizer is frozen).

Memory is the step's peak above what is allocated before it (weights, gradients and
optimizer state of a warmed-up run): ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
the running sum of every allocation and free the torch profiler records, op by op.
The last test prints the SAR / TF ratios.
"""

from __future__ import annotations

import os

import pytest
import torch

from sar_core.plugins import get_registry
from sar_core.sar_step import sar_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
AMP = os.environ.get("SAR_BENCH_AMP", "none")
BATCH = 4
VAR_CONFIG = dict(depth=6, embed_dim=384, num_heads=6, patch_nums=(1, 2, 3, 4, 5, 6, 8), vocab_size=4096,
                  Cvae=32, ch=32, num_classes=1000, drop_path_rate=0.0, cond_drop_rate=0.1)

#: name -> (rollout, rollout options, loss)
VARIANTS = {
    "tf": ("none", {}, "hard"),
    "sar-ssr-all": ("ssr", {"scales": "all"}, "hard"),
    "sar-ssr-last": ("ssr", {"scales": "last"}, "hard"),
    "sar-official": ("official", {}, "hard"),  # guided top-k / top-p sampled rollout, short pass
}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    adapter = get_registry().get("adapter", "var").from_config(VAR_CONFIG).to(DEVICE)
    adapter.backbone.train()
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    images = torch.rand(BATCH, 3, h, w, device=DEVICE) * 2 - 1
    with torch.no_grad():
        codes = adapter.encode(images, schedule)
    labels = torch.randint(0, VAR_CONFIG["num_classes"], (BATCH,), device=DEVICE)
    return adapter, codes, labels, schedule


def _autocast():
    if DEVICE.type != "cuda" or AMP == "none":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[AMP])


def _make_step(model, variant: str):
    adapter, codes, labels, schedule = model
    reg = get_registry()
    rollout_name, options, loss_name = VARIANTS[variant]
    rollout = reg.get("rollout", rollout_name)(**options)
    loss = reg.get("loss", loss_name)()
    opt = torch.optim.AdamW(adapter.backbone.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast():
            sar_step(adapter, adapter.backbone, labels, codes, schedule, rollout, loss, gamma=0.01,
                     generator=gen, backward=lambda l: l.backward())
        opt.step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return step


def _peak_bytes(step) -> int:
    """Peak memory of one step above the memory allocated before it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cur = peak = 0
    for _, nbytes in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        cur += nbytes
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step(benchmark, model, variant):
    step = _make_step(model, variant)
    step()  # warm-up: gradients and optimizer state exist from here on
    peak = _peak_bytes(step)
    benchmark.extra_info.update({"peak_mib": peak / 2 ** 20, "device": str(DEVICE), "amp": AMP})
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    RESULTS[variant] = {"mean_s": benchmark.stats.stats.mean, "peak_mib": peak / 2 ** 20}
    assert peak > 0


def test_print_ratios(capsys):
    if "tf" not in RESULTS or len(RESULTS) < 2:
        pytest.skip("run the whole file to compare variants")
    tf = RESULTS["tf"]
    lines = [f"SAR vs TF step on {DEVICE} (amp {AMP}), var d6 w384, schedule 1..8, batch {BATCH}",
             f"{'variant':<14}{'time ms':>10}{'x TF':>8}{'peak MiB':>11}{'x TF':>8}"]
    for name, r in RESULTS.items():
        lines.append(f"{name:<14}{1e3 * r['mean_s']:>10.1f}{r['mean_s'] / tf['mean_s']:>8.2f}"
                     f"{r['peak_mib']:>11.1f}{r['peak_mib'] / tf['peak_mib']:>8.2f}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
