"""Families whose scales attend within themselves only (``attention = "within-scale"``):
the core runs a one-scale student pass over that scale alone, reads no prefix, and the
contract suite tells the two attention patterns apart."""

import random

import pytest
import torch
from torch.utils.data import TensorDataset

import test_contract
import toy_adapter as toy
from sar_core.evaluate.diagnostics import exposure_gap
from sar_core.plugins import _validate
from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.rollouts import BUILTIN_ROLLOUTS
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule
from toy_adapter import ToyAdapter, ToyConfig, ToyWithinScaleAdapter


def prepared(suite):
    adapter = suite.prepared_adapter()
    batch = suite.make_batch(adapter, suite.batch_size, torch.Generator().manual_seed(0))
    return adapter, batch, adapter.encode(batch.images, suite.schedule(adapter))


def test_masks_of_both_patterns():
    s = Schedule([1, 2])
    causal, within = s.attention_mask(), s.attention_mask(pattern="within-scale")
    assert causal[0].tolist() == within[0].tolist() == [True, False, False, False, False]
    assert causal[1:].all()
    assert within[1:, 1:].all() and not within[1:, :1].any()
    assert (s.attention_bias(pattern="within-scale")[0, 0] == 0).equal(within)
    with pytest.raises(ValueError, match="block-causal, within-scale"):
        s.attention_mask(pattern="causal")


def recording_forward(adapter, seen: list):
    plain = adapter.backbone.forward

    def forward(cond, inputs, schedule, student_forcing=False, **kw):
        seen.append(len(schedule))
        return plain(cond, inputs, schedule, student_forcing, **kw)

    adapter.backbone.forward = forward


def test_ssr_last_runs_the_last_scale_alone_with_two_memory_lean_backwards():
    torch.manual_seed(0)
    adapter = ToyWithinScaleAdapter.from_config(ToyConfig())
    sched = adapter.default_schedule
    gt = adapter.encode(torch.rand(2, 3, 8, 8) * 2 - 1, sched)
    cond = torch.tensor([1, 2])
    seen, backwards = [], []
    recording_forward(adapter, seen)
    res = sar_step(adapter, adapter.backbone, cond, gt, sched, BUILTIN_ROLLOUTS["ssr"](scales="last"),
                   BUILTIN_LOSSES["hard"](), 0.5, backward=lambda l: (backwards.append(1), l.backward()))
    assert seen == [len(sched), 2]                        # TF pass, then [scale 0, last scale]
    assert len(backwards) == 2                            # L_TF freed before pass 2, then gamma * L_CSF
    assert res.student.logits.shape[1] == sched.token_counts[-1]
    seen.clear()
    full = BUILTIN_ROLLOUTS["ssr"](scales="last", reuse_prefix=False)
    sar_step(adapter, adapter.backbone, cond, gt, sched, full, BUILTIN_LOSSES["hard"](), 0.5, rng=random.Random(0))
    assert seen == [len(sched), len(sched)]


def test_exposure_gap_of_a_within_scale_family_runs_each_scale_alone(monkeypatch):
    torch.manual_seed(0)
    adapter = ToyWithinScaleAdapter.from_config(ToyConfig())
    adapter.liven(torch.Generator().manual_seed(0))
    adapter.backbone.eval()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    data = TensorDataset(images, torch.tensor([0, 1, 2, 3]))
    seen: list = []
    recording_forward(adapter, seen)
    short = exposure_gap(adapter, data, None, batch_size=4, maps=True)
    K = len(adapter.default_schedule)
    assert seen == [K] + [2] * (K - 1)                    # the TF pass, then each scale k+1 alone
    monkeypatch.setattr(ToyWithinScaleAdapter, "attention", "block-causal")   # the core's view only:
    monkeypatch.setattr(ToyWithinScaleAdapter, "prefix_stable", False)        # the mask stays within-scale
    full = exposure_gap(adapter, data, None, batch_size=4, maps=True)
    for a, b in zip(short["scales"][1:], full["scales"][1:]):
        assert a["sf_ce"] == pytest.approx(b["sf_ce"], abs=1e-5) and a["sf_acc"] == pytest.approx(b["sf_acc"])
    for a, b in zip(short["maps"][1:], full["maps"][1:]):
        torch.testing.assert_close(a, b)
    assert short["scales"][1]["gap_ce"] != 0.0


def test_suite_fails_a_block_causal_family_that_declares_within_scale(monkeypatch):
    suite = test_contract.TestToyContract()
    adapter, batch, gt = prepared(suite)
    monkeypatch.setattr(ToyAdapter, "attention", "within-scale")   # built block-causal: the mask stays
    with pytest.raises(AssertionError, match="within-scale"):
        suite.test_teacher_forced_logits_read_no_later_scale(adapter, batch, gt)
    with pytest.raises(AssertionError, match="alone"):
        suite.test_within_scale_a_scale_alone_equals_the_full_pass(adapter, batch, gt)


def test_suite_fails_a_within_scale_family_that_declares_block_causal(monkeypatch):
    suite = test_contract.TestToyWithinScaleContract()
    adapter, batch, gt = prepared(suite)
    monkeypatch.setattr(ToyWithinScaleAdapter, "attention", "block-causal")   # built within-scale
    with pytest.raises(AssertionError, match="within-scale"):
        suite.test_teacher_forced_logits_read_no_later_scale(adapter, batch, gt)


def test_registry_refuses_unknown_patterns_and_a_within_scale_prefix():
    class Odd(ToyAdapter):
        attention = "sliding-window"

    class Reusing(ToyWithinScaleAdapter):
        reuses_prefix = True

    assert "block-causal, within-scale" in _validate("adapter", "odd", Odd)
    assert "no prefix to reuse" in _validate("adapter", "reusing", Reusing)
    assert _validate("adapter", "toy-within", ToyWithinScaleAdapter) is None


def test_a_within_scale_family_trains_with_ssr_last_from_the_cli(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy-within", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4", "--workers", "0",
                   "--loggers", "jsonl", "--out", out, "--steps", "2", "--rollout", "ssr", "--ssr-scales", "last",
                   "--csfl", "hard", "--gamma", "0.5", "--lr", "1e-3")
    assert r.exit_code == 0, r.output
    rows = toy.read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2] and all(row["loss_csf"] > 0 for row in rows)
