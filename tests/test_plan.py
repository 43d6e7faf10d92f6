"""``sar plan``: fake-tensor traces against a real measured step, the depth / batch fit
against a full-depth trace, and the arithmetic of the plan (state per rank, largest
micro-batch, time, GPU hours)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.plan_bench import compare
from sar_cli.main import app
from sar_core.plugins import get_registry
from sar_core.train.config import build_config
from sar_core.train.plan import GIB, Hardware, make_plan, max_micro_batch, state_bytes, variants
from sar_core.train.plan_trace import Variant, trace_run

TINY = dict(depth=3, embed_dim=64, num_heads=2, vocab_size=64, Cvae=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
            num_classes=10, drop_path_rate=0.0, cond_drop_rate=0.1)
PATCH_NUMS = (1, 2, 3, 4, 6, 8)
SSR = Variant("ssr-all", "ssr", (("scales", "all"),))
TF = Variant("tf", "none")


def tiny_config(**train) -> object:
    model = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}
    return build_config({"model": {"family": "var", "overrides": {**model, "patch_nums": list(PATCH_NUMS)}},
                         "data": {"name": "digits"}, "rollout": {"name": "ssr", "scales": "all"},
                         "train": {"batch_size": 8, **train}})


@pytest.fixture(scope="module")
def traced():
    return trace_run(tiny_config(), variants(tiny_config(), compare=False) + [Variant("ssr-full", "ssr",
                     (("scales", "all"),), "full")], get_registry())


def test_planned_memory_and_flops_match_a_measured_step():
    """The benchmark's whole-process peak (live tensor storages of a real CPU step) within
    20% (here within a few %), FLOPs within 1%: depth 3 and batch 6 from traces at 1-2
    blocks and batch 1-2."""
    rows = compare(dict(TINY), PATCH_NUMS, 6, ["tf", "ssr-all", "ssr-all+full"], log=lambda m: None)
    for r in rows:
        assert abs(r["error"]) < 0.2, r
        assert r["planned_flops"] == pytest.approx(r["measured_flops"], rel=0.01), r


def test_the_depth_and_batch_fit_equals_a_full_depth_trace(traced):
    full = trace_run(tiny_config(), [SSR, TF], get_registry(), images=False, full_depth=True)
    fit = next(s for s in traced.steps if s.variant.rollout == "ssr" and s.variant.ckpt == "none")
    for b in (1, 2):
        assert fit.flops.at(b) == pytest.approx(full.steps[0].flops.at(b), rel=1e-6)
    # the fit's phases carry the images the trainer holds, the full trace's (images=False) do not
    h, w = traced.facts.image_size
    images = 3 * h * w * 4
    for phase, line in full.steps[0].phases.items():
        assert fit.phases[phase].at(2) - 2 * images == pytest.approx(line.at(2), rel=0.02), phase
    # teacher forcing read off SSR's first pass (not traced again) equals its own trace
    alone = trace_run(tiny_config(), [TF], get_registry(), images=False, full_depth=True).steps[0]
    derived = full.steps[1]
    assert derived.flops == alone.flops
    assert all(derived.phases[p] == alone.phases[p] for p in ("inputs", "fwd 1", "bwd 1"))
    assert alone.peak(4) == derived.peak(4)


def test_state_per_rank_follows_the_strategy(traced):
    f = traced.facts
    assert f.params == f.trainable and f.param_bytes == 4 * f.params and f.depth == 3
    single = state_bytes(traced, "ddp", 1, ema=False)
    assert single["weights"] == single["gradients"] == f.param_bytes and "DDP gradient buckets" not in single
    assert single["AdamW moments"] == 2 * f.param_bytes and single["EMA"] == 0
    ddp = state_bytes(traced, "ddp", 8, ema=True)
    assert ddp["DDP gradient buckets"] == ddp["EMA"] == f.param_bytes
    fsdp = state_bytes(traced, "fsdp", 8, ema=True)
    assert fsdp["weights"] == fsdp["EMA"] == f.param_bytes / 8 and fsdp["AdamW moments"] == 2 * f.param_bytes / 8
    assert fsdp["FSDP2 unsharded (2 blocks + root, grads)"] >= 3 * f.block_param_bytes
    assert fsdp["tokenizer (frozen)"] == single["tokenizer (frozen)"] == f.tokenizer_bytes > 0


def test_plan_arithmetic_is_consistent(traced):
    cfg = tiny_config()
    hw = Hardware(gpus=2, memory_gib=0.05, peak_tflops=100.0, mfu=0.5, headroom=0.1)
    plan = make_plan(cfg, hw, get_registry(), dataset_size=1000, epochs=2, traced=traced)
    own, tf, full = plan.rows[0], plan.rows[1], plan.rows[2]
    assert (own.label, tf.label, full.ckpt) == ("ssr (this run)", "tf", "full")
    assert plan.micro_batch == 4  # global 8 over 2 GPUs
    # the largest micro-batch fits, one more does not
    state = sum(plan.state_gib.values()) * GIB - plan.state_gib["gradients"] * GIB
    step = traced.steps[0]
    m = own.max_micro_batch
    assert m >= 1
    worst = lambda b: max(step.peak(b), traced.encode.peak(b))  # noqa: E731
    assert state + worst(m) <= hw.budget < state + worst(m + 1)
    assert m == max_micro_batch(step, traced.encode, hw.budget - state)
    # time: FLOPs per image over mfu x peak; GPU hours for epochs x images
    assert 1.7 < (own.flops_per_image - plan.encode_flops_per_image) / (tf.flops_per_image - plan.encode_flops_per_image) < 2.3
    sec = own.flops_per_image / (0.5 * 100e12)
    assert own.step_s == pytest.approx(4 * sec, rel=1e-9)  # 4 images per rank and step
    assert own.gpu_hours == pytest.approx(2 * 1000 * sec / 3600, rel=1e-9)
    # full checkpointing: less memory per image, recomputation costs FLOPs
    assert full.per_image_gib < own.per_image_gib and full.flops_per_image > own.flops_per_image
    slower = make_plan(cfg, Hardware(2, 0.05, 100.0, 0.25, 0.1), get_registry(), 1000, 2, traced=traced)
    assert slower.rows[0].gpu_hours == pytest.approx(2 * own.gpu_hours)


def test_plan_reads_checkpoint_files_for_their_shapes_only():
    """A miniature's files: the same model as a real load, planned from shapes."""
    d = "plugins/assets/minis/infinity"
    cfg = build_config({"model": {"family": "infinity", "tokenizer": f"{d}/tokenizer.pth",
                                  "backbone": f"{d}/backbone.pth"}, "data": {"name": "digits"}})
    real = get_registry().get("adapter", "infinity").load(f"{d}/tokenizer.pth", f"{d}/backbone.pth")
    t = trace_run(cfg, [Variant("tf", "none")], get_registry(), images=False)
    assert t.facts.params == sum(p.numel() for p in real.backbone.parameters())
    assert t.facts.schedule == str(real.default_schedule)
    assert t.steps[0].peak(2) > t.steps[0].peak(1) > 0 and t.steps[0].flops.b > 0


def test_example_batch_gives_text_features_of_the_asked_length():
    ad = get_registry().get("adapter", "infinity").from_config(
        {"backbone": {"depth": 1, "embed_dim": 32, "num_heads": 2, "block_chunks": 1, "mlp_hidden": 64,
                      "text_channels": 16, "text_maxlen": 8},
         "tokenizer": {"codebook_dim": 4, "base_ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "patch_size": 2},
         "schedule": [[1, 1], [2, 2], [4, 4]]})
    batch = ad.example_batch(3, condition_tokens=5)
    feats = batch.conditions["text_features"]
    assert feats.values.shape == (3, 5, 16) and feats.lengths.tolist() == [5, 5, 5]
    assert batch.images.shape[:2] == (3, 3) and tuple(batch.images.shape[2:]) == ad.training_image_size(
        ad.schedule_sampler())
    assert ad.condition(batch)["kv_compact"].shape == (15, 16)
    assert ad.example_batch(2).conditions["text_features"].values.shape[1] == 8
    with pytest.raises(ValueError, match="text_maxlen"):
        ad.example_batch(2, condition_tokens=9)


def test_default_example_batch_builds_the_declared_payloads():
    """A plugin family without its own example_batch: every payload it declares, checked by its
    own condition(); rows that vary need --condition-tokens."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import toy_pair_adapter as pair

    ad = pair.ToyPairAdapter.from_config(pair.ToyPairConfig())
    batch = ad.example_batch(3, image_size=(16, 16), condition_tokens=4)
    pooled, tokens = batch.conditions[pair.POOLED], batch.conditions[pair.TOKENS]
    assert pooled.values.shape == (3, 1, ad.config.pooled_dim) and pooled.lengths.tolist() == [1, 1, 1]
    assert tokens.values.shape == (3, 4, ad.config.text_dim) and batch.labels is None
    assert ad.condition(batch)["features"].shape == (3, 4, ad.config.text_dim)
    assert tuple(batch.images.shape) == (3, 3, 16, 16) and -1 <= batch.images.min() <= batch.images.max() <= 1
    with pytest.raises(ValueError, match="--condition-tokens"):
        ad.example_batch(2, image_size=(16, 16))


def test_cli_plan_prints_and_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    overrides = json.dumps({**{k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()},
                            "patch_nums": [1, 2, 3]})
    args = ["plan", "-f", "var", "--set", f"model.overrides={overrides}",  # no --data: images
            "--batch-size", "4", "--rollout", "none", "--gpus", "2", "--gpu-memory", "1", "--dataset-size", "100",
            "--epochs", "3", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "state per rank" in res.output and "GPU h (3 ep x 100)" in res.output
    plan = json.loads(out.read_text())
    assert [r["label"] for r in plan["rows"]] == ["none (this run)"]  # == tf: traced once
    assert plan["micro_batch"] == 2 and plan["rows"][0]["max_micro_batch"] > 2
    assert plan["model"]["image_size"] == [6, 6] and plan["encode_gib_per_image"] > 0  # 3 tokens x 2 px (ch_mult 1,1)
    assert math.isclose(plan["rows"][0]["gpu_hours"], 300 * plan["rows"][0]["flops_per_image"] / (0.4 * 312e12) / 3600,
                        rel_tol=1e-9)
    bad = CliRunner().invoke(app, args[:-2] + ["--mfu", "1.5"])
    assert bad.exit_code == 2 and "error: --mfu must lie in (0, 1]" in bad.output
    assert len([ln for ln in bad.output.splitlines() if ln.strip()]) == 1
