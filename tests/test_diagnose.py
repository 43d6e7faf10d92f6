"""Exposure gap: zero for an oracle rollout, equal to a manual computation, CLI outputs."""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.evaluate.diagnostics import exposure_gap
from sar_core.tokens import cat_codes, token_argmax, token_ce
from sar_plugins.digits import digits

FIX = Path(__file__).parent / "fixtures" / "var"


@pytest.fixture(scope="module")
def var():
    from sar_adapters.var.adapter import VARAdapter

    adapter = VARAdapter.load(FIX / "vae_ch32v64z8.pth", FIX / "var_tiny_d2w64.pth")
    adapter.backbone.eval()  # the manual computations below must be deterministic
    adapter.backbone.cond_drop_rate = 0.0
    return adapter


@pytest.fixture(scope="module")
def data():
    return Subset(digits("val", 64), range(6))


@pytest.fixture(scope="module")
def report(var, data):
    return exposure_gap(var, data, None, batch_size=6)


def test_oracle_predictions_give_exactly_zero_gap(var, data, monkeypatch):
    monkeypatch.setattr(type(var), "prefix_stable", False)  # full passes: bit-equal to the TF pass
    for mode in ("per_scale", "joint"):
        r = exposure_gap(var, data, batch_size=3, mode=mode, predict=lambda logits, gt: gt)
        for row in r["scales"][1:]:
            assert row["gap_ce"] == 0.0 and row["gap_acc"] == 0.0
    monkeypatch.setattr(type(var), "prefix_stable", True)  # shorter passes: float rounding only
    r = exposure_gap(var, data, batch_size=3, predict=lambda logits, gt: gt)
    for row in r["scales"][1:]:
        assert abs(row["gap_ce"]) < 1e-5 and row["gap_acc"] == 0.0


def _teacher_forced(var, data):
    """(schedule, labels, codes, target, TF logits) of the whole data, computed by hand."""
    sched = var.default_schedule
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.stack([data[i][1] for i in range(len(data))])
    codes = var.encode(images, sched)
    with torch.no_grad():
        tf = var.forward(labels, var.teacher_inputs(codes, sched), sched)
    return sched, labels, codes, cat_codes(codes), tf


def test_gap_equals_a_manual_computation(var, data, report):
    sched, labels, codes, target, tf = _teacher_forced(var, data)
    preds = [token_argmax(tf[:, sched.slice(k)], None) for k in range(len(sched))]
    for k in (0, 3):
        with torch.no_grad():
            sf = var.forward(labels, var.stagger_inputs(codes, preds, sched, [k]), sched)
        sl = sched.slice(k + 1)
        tf_ce = token_ce(tf[:, sl], target[:, sl], None).mean().item()
        sf_ce = token_ce(sf[:, sl], target[:, sl], None).mean().item()
        row = report["scales"][k + 1]
        assert row["tf_ce"] == pytest.approx(tf_ce, abs=1e-5)
        assert row["sf_ce"] == pytest.approx(sf_ce, abs=1e-5)
        assert row["gap_ce"] == pytest.approx(sf_ce - tf_ce, abs=1e-5)
        sf_acc = (sf[:, sl].argmax(-1) == target[:, sl]).float().mean().item()
        assert row["sf_acc"] == pytest.approx(sf_acc, abs=1e-6)
        assert row["input_error"] == pytest.approx(1 - (preds[k] == codes[k]).float().mean().item(), abs=1e-6)


def test_standard_errors_equal_a_manual_computation(var, data, report):
    """The noise of the deterministic val metrics: sd over images / sqrt(n)."""
    sched, labels, codes, target, tf = _teacher_forced(var, data)
    with torch.no_grad():
        per_tok = token_ce(tf, target, None)
        preds = [token_argmax(tf[:, sched.slice(k)], None) for k in range(len(sched))]
        gaps = []
        for k in range(len(sched) - 1):
            sf = var.forward(labels, var.stagger_inputs(codes, preds, sched, [k]), sched)
            sl = sched.slice(k + 1)
            gaps.append((token_ce(sf[:, sl], target[:, sl], None) - per_tok[:, sl]).mean(1))
    n = len(data)
    se = report["standard_error"]
    assert se["val_loss_tf"] == pytest.approx(per_tok.mean(1).std().item() / n ** 0.5, rel=1e-4)
    assert se["mean_gap_ce"] == pytest.approx(torch.stack(gaps).mean(0).std().item() / n ** 0.5, rel=1e-4)


def test_random_model_has_a_nonzero_gap_and_report_shape(report):
    assert report["num_samples"] == 6 and report["schedule"] == [1, 2, 3, 4, 6, 8]
    assert report["scales"][0]["sf_ce"] is None
    assert any(abs(r["gap_ce"]) > 1e-3 for r in report["scales"][1:])
    mean = sum(r["gap_ce"] for r in report["scales"][1:]) / 5
    assert report["mean_gap_ce"] == pytest.approx(mean)


def test_joint_mode_matches_per_scale_at_the_first_transition(var, data, report):
    joint = exposure_gap(var, data, batch_size=6, mode="joint")
    # scale 1 sees only the start token below it: staggering the others cannot matter there
    assert joint["scales"][1]["sf_ce"] == pytest.approx(report["scales"][1]["sf_ce"], abs=1e-5)
    assert any(abs(j["sf_ce"] - p["sf_ce"]) > 1e-4 for j, p in zip(joint["scales"][2:], report["scales"][2:]))


def test_batches_cap_and_state_restored(var, data):
    var.backbone.train()
    var.backbone.cond_drop_rate = 0.25
    r = exposure_gap(var, data, batches=1, batch_size=2)
    assert r["num_samples"] == 2
    assert var.backbone.training and var.backbone.cond_drop_rate == 0.25
    var.backbone.eval()
    var.backbone.cond_drop_rate = 0.0
    with pytest.raises(ValueError, match="two scales"):
        exposure_gap(var, data, "8")
    with pytest.raises(ValueError, match="mode"):
        exposure_gap(var, data, mode="both")


def test_code_cache_input_gives_the_same_report(var, data, report, tmp_path):
    from sar_core.data.code_cache import CodeCacheDataset, build_code_cache

    build_code_cache(var, data, None, tmp_path / "c")
    cached = exposure_gap(var, CodeCacheDataset(tmp_path / "c", var), batch_size=6)
    for a, b in zip(cached["scales"], report["scales"]):
        assert a["tf_ce"] == pytest.approx(b["tf_ce"], abs=1e-6)
        assert (a["sf_ce"] is None) == (b["sf_ce"] is None)
        if a["sf_ce"] is not None:
            assert a["sf_ce"] == pytest.approx(b["sf_ce"], abs=1e-6)


def test_diagnose_cli_writes_json_and_png(tmp_path):
    from PIL import Image

    out, plot = tmp_path / "gap.json", tmp_path / "gap.png"
    r = CliRunner().invoke(app, ["diagnose", "-f", "var", "--tokenizer", str(FIX / "vae_ch32v64z8.pth"),
                                 "--backbone", str(FIX / "var_tiny_d2w64.pth"), "--data", "digits",
                                 "--batches", "1", "--batch-size", "3", "--out", str(out), "--plot", str(plot),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["num_samples"] == 3 and len(rep["scales"]) == 6
    with Image.open(plot) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert "exposure gap" in r.output


def test_prefix_stable_short_passes_give_the_full_pass_report(var, data, report, monkeypatch):
    """VAR is prefix-stable: the per-scale passes run only up to the scale they measure;
    the report equals the one from full passes."""
    assert type(var).prefix_stable
    monkeypatch.setattr(type(var), "prefix_stable", False)
    full = exposure_gap(var, data, None, batch_size=6, maps=True)
    monkeypatch.setattr(type(var), "prefix_stable", True)
    replayed = exposure_gap(var, data, None, batch_size=6, maps=True)      # scale k+1 alone on the TF K/V
    monkeypatch.setattr(type(var), "reuses_prefix", False)
    short = exposure_gap(var, data, None, batch_size=6, maps=True)         # the first k+2 scales
    for other in (replayed, short):
        for a, b in zip(full["scales"][1:], other["scales"][1:]):
            assert a["sf_ce"] == pytest.approx(b["sf_ce"], abs=1e-5)
            assert a["sf_acc"] == pytest.approx(b["sf_acc"], abs=1e-6)
        for a, b in zip(full["maps"][1:], other["maps"][1:]):
            torch.testing.assert_close(a, b)
        assert other["standard_error"] == pytest.approx(full["standard_error"], abs=1e-6)
    from sar_core.sar.prefix_cache import PrefixKV
    with pytest.raises(ValueError, match="head"):
        PrefixKV(5).head(6)


def test_contract_suite_catches_a_family_that_is_not_prefix_stable(var, data, monkeypatch):
    """A family whose early logits depend on the schedule's last scale must not declare it."""
    from sar_core.testing import AdapterContractTests, default_batch

    suite = AdapterContractTests()
    batch = default_batch(var, 2, torch.Generator().manual_seed(0))
    gt = var.encode(batch.images, var.default_schedule)
    suite.test_prefix_stable_logits_do_not_depend_on_later_scales(var, batch, gt)  # the real one passes
    plain = type(var).forward

    def leaky(self, cond, inputs, schedule, student_forcing=False):
        return plain(self, cond, inputs, schedule, student_forcing) + 1e-3 * schedule.total_tokens

    monkeypatch.setattr(type(var), "forward", leaky)
    with pytest.raises(AssertionError):
        suite.test_prefix_stable_logits_do_not_depend_on_later_scales(var, batch, gt)
