"""Deeper SSR rollouts (``ssr`` ``depth`` > 1): inputs rebuilt by hand from the mixed code
history on the toy and a VAR miniature, depth 1 = the one-step pass, refusals, BSC, and
``sar train --ssr-depth`` from the CLI. The per-adapter properties are in the contract
suite (``sar_core.testing.checks_deep``)."""

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange

from sar_adapters.var import VARAdapter, VARConfig
from sar_core.sar.losses import BUILTIN_LOSSES, HardCSFL
from sar_core.sar.rollouts import StaggerScaleRollout
from sar_core.sar.step import sar_step
from sar_core.tokens import token_argmax

import toy_adapter as toy
from cli_asserts import one_error_line

VAR_FIX = Path(__file__).parent / "fixtures" / "var"


def _toy():
    torch.manual_seed(0)
    ad = toy.ToyAdapter.from_config(toy.ToyConfig())
    ad.backbone.eval()
    return ad


def _var():
    torch.manual_seed(0)
    ad = VARAdapter.from_config(VARConfig(
        vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=2, embed_dim=32,
        num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0, drop_path_rate=0.0))
    ad.liven(torch.Generator().manual_seed(0))   # predictions then differ from ground truth
    ad.backbone.eval()
    return ad


def _data(ad, seed=0):
    sched = ad.schedule_sampler().default
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, *ad.image_size(sched), generator=g) * 2 - 1
    return sched, ad.encode(images, sched), torch.tensor([0, 1, 2])


def _argmax(logits, sched, bits=None):
    return [token_argmax(logits[:, sched.slice(k)].float(), bits) for k in range(len(sched))]


def _toy_inputs(ad, history, sched):
    """Toy: the input of scale s is its codeword grid of the codes at s-1, resized."""
    sides = sched.sides
    return torch.cat([ad.tokenizer._next_input(history[s - 1], sides[s - 1], sides[s]) for s in range(1, len(sides))], 1)


def _var_input(ad, history, sched, s):
    """VAR: area(sum over t < s of phi_t(up(codeword map of history[t]))) at side s."""
    q, sides = ad.tokenizer.quantize, sched.sides
    f_hat = sum(q.lift(q.codes_to_map(history[t], sides[t]), t, sides) for t in range(s))
    return rearrange(F.interpolate(f_hat, size=(sides[s], sides[s]), mode="area"), "b c h w -> b (h w) c")


def _history(gt, preds, j, s):
    """Scale s's code history in pass j: gt[..s-j], P1[s-j+1], ..., P_{j-1}[s-1]."""
    return [gt[t] if t <= s - j else preds[t - s + j - 1][t] for t in range(s)] + [None]


def test_toy_depth_3_inputs_are_the_mixed_history_by_hand():
    ad = _toy()
    sched, gt, cond = _data(ad)
    res = sar_step(ad, ad.backbone, cond, gt, sched, StaggerScaleRollout(depth=3), HardCSFL(), 0.5)
    sp2, sp3, sp4 = res.students
    p1 = _argmax(res.tf_logits, sched)
    p2 = _argmax(sp2.full.detach(), sched)
    p3 = _argmax(sp3.full.detach(), sched)
    with torch.no_grad():
        tf = _toy_inputs(ad, gt, sched)
        want2 = _toy_inputs(ad, p1, sched)
        want3 = torch.cat([tf[:, :sched.offsets[2] - 1], _toy_inputs(ad, p2, sched)[:, sched.offsets[2] - 1:]], 1)
        want4 = torch.cat([tf[:, :sched.offsets[3] - 1], _toy_inputs(ad, p3, sched)[:, sched.offsets[3] - 1:]], 1)
    for sp, want in ((sp2, want2), (sp3, want3), (sp4, want4)):
        torch.testing.assert_close(sp.inputs, want, atol=1e-6, rtol=1e-6)
    assert not torch.equal(want3, want2)   # the own predictions of pass 2 reached pass 3
    assert (sp2.scales, sp3.scales, sp4.scales) == ((1, 2, 3), (2, 3), (3,))


def test_var_depth_2_and_3_inputs_are_the_mixed_history_by_hand():
    ad = _var()
    sched, gt, cond = _data(ad)
    res = sar_step(ad, ad.backbone, cond, gt, sched, StaggerScaleRollout(depth=3), HardCSFL(), 0.5)
    preds = [_argmax(res.tf_logits, sched)] + [_argmax(sp.full.detach(), sched) for sp in res.students]
    assert not all(torch.equal(a, b) for a, b in zip(preds[0], gt))
    first = sched.first_len
    with torch.no_grad():
        for j, sp in enumerate(res.students, start=2):
            for s in range(1, len(sched)):
                hist = gt if s < j - 1 else _history(gt, preds, j, s)
                got = sp.inputs[:, sched.offsets[s] - first:sched.offsets[s + 1] - first]
                torch.testing.assert_close(got, _var_input(ad, hist, sched, s), atol=1e-5, rtol=1e-5,
                                           msg=lambda m, j=j, s=s: f"pass {j} scale {s}: {m}")
        # pass 3 at scale 3 mixes gt[0], P1[1], P2[2]: differs from pass 2's gt[0..1], P1[2]
        sl3 = slice(sched.offsets[3] - first, sched.offsets[4] - first)
        assert not torch.allclose(res.students[1].inputs[:, sl3], res.students[0].inputs[:, sl3])


def test_depth_1_is_the_one_step_pass_exactly():
    ad = _var()
    sched, gt, cond = _data(ad)
    ro = StaggerScaleRollout(depth=1)
    assert ro.passes(sched) == 1
    res = sar_step(ad, ad.backbone, cond, gt, sched, ro, HardCSFL(), 0.5)
    assert res.students == [res.student] and res.student.scales == (1, 2, 3)
    with torch.no_grad():
        inputs = ad.stagger_inputs(gt, res.pred_codes, sched, [0, 1, 2])
        logits = ad.backbone(cond, inputs, sched)
    assert torch.equal(res.student.inputs, inputs)
    assert torch.equal(res.student.logits, logits[:, sched.offsets[1]:])
    want = BUILTIN_LOSSES["hard"]()(res.student, None).mean()
    assert torch.equal(res.loss_csf, want)


def test_gradients_of_every_deeper_pass_and_none_into_targets():
    ad = _toy()
    sched, gt, cond = _data(ad)
    ad.backbone.zero_grad(set_to_none=True)
    grads = []
    res = sar_step(ad, ad.backbone, cond, gt, sched, StaggerScaleRollout(depth=2), HardCSFL(), 0.5,
                   backward=lambda l: grads.append(torch.autograd.grad(l, ad.backbone.head.weight,
                                                                        allow_unused=True, retain_graph=False)[0]))
    # backward 1: L_TF; then one per deeper pass, each gamma * its half of the mean
    assert len(grads) == 3 and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
    for sp in res.students:
        assert not sp.logits.requires_grad and sp.full is None   # detached after its backward
        assert not sp.teacher_logits.requires_grad and not sp.inputs.requires_grad
    assert not res.loss_csf.requires_grad and res.loss_csf > 0


def test_bad_depths_are_refused_naming_the_fix():
    sched = _toy().schedule_sampler().default
    with pytest.raises(ValueError, match="scales='all'.*--ssr-scales all"):
        StaggerScaleRollout(scales="last", depth=2)
    with pytest.raises(ValueError, match=">= 1"):
        StaggerScaleRollout(depth=0)
    with pytest.raises(ValueError, match="upstream"):
        StaggerScaleRollout(depth=2, upstream_exact=True)
    with pytest.raises(ValueError, match="--ssr-depth 3"):
        StaggerScaleRollout(depth=4).check_schedule(sched)
    StaggerScaleRollout(depth=3).check_schedule(sched)
    assert StaggerScaleRollout(depth=3).passes(sched.sub([0, 1])) == 1   # a shorter drawn schedule


def test_infinity_bsc_history_feeds_the_deeper_passes():
    from sar_adapters.infinity import InfinityAdapter

    fix = Path(__file__).parent / "fixtures" / "infinity"
    inf = InfinityAdapter.load(fix / "infinity_vae_d16_tiny.pth", fix / "infinity_tiny_d4c4w64.pth")
    case = torch.load(fix / "case.pt", weights_only=True)
    from sar_core.schedule import Schedule

    sch = Schedule(case["scale_schedule"])
    inf.backbone.train()
    inf.config.bsc_layers = 4
    try:
        gt = inf.encode(case["images"], sch)
        assert gt.history is not None and not all(torch.equal(a, b) for a, b in zip(gt, gt.history))
        cond = inf.text_condition(case["text_kv_compact"], case["text_lens"])
        res = sar_step(inf, inf.backbone, cond, gt, sch, StaggerScaleRollout(depth=2), HardCSFL(), 0.5,
                       generator=torch.Generator().manual_seed(0), rng=random.Random(0))
        one = inf.stagger_inputs(gt, res.pred_codes, sch, list(range(len(sch) - 1)))
        tf = inf.teacher_inputs(gt, sch)
    finally:
        inf.config.bsc_layers = 0
        inf.backbone.eval()
    sp2, sp3 = res.students
    torch.testing.assert_close(sp2.inputs, one, atol=1e-6, rtol=1e-6)   # the flipped history below k
    n1 = sch.offsets[2] - sch.first_len
    torch.testing.assert_close(sp3.inputs[:, :n1], tf[:, :n1], atol=0, rtol=0)   # scale 1: teacher input
    assert torch.isfinite(res.loss_csf) and res.loss_csf > 0


def _train(out, *extra):
    return toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4",
                      "--workers", "0", "--loggers", "jsonl", "--steps", "2", "--lr", "1e-3", "--gamma", "0.5",
                      "--rollout", "ssr", "--out", out, *extra)


def test_cli_trains_with_ssr_depth_and_refuses_bad_ones(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "deep"
    r = _train(out, "--ssr-depth", "2")
    assert r.exit_code == 0, r.output
    rows = toy.read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2] and all(m["loss_csf"] > 0 and m["skipped"] == 0 for m in rows)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rollout"]["depth"] == 2 and saved["rollout"]["name"] == "ssr"
    assert "over all scales (default) at depth 2" in r.output   # the run's settings line
    one_error_line(_train(tmp_path / "a", "--ssr-depth", "2", "--ssr-scales", "last"), "--ssr-scales all")
    one_error_line(_train(tmp_path / "b", "--ssr-depth", "4"), "depth 4", "--ssr-depth 3")
    r = _train(tmp_path / "c", "--ssr-depth", "0")   # the run config's own (multi-field) report
    assert r.exit_code == 2 and "rollout.depth" in r.output and "greater than or equal to 1" in r.output
    assert "Traceback" not in r.output


def test_cli_var_miniature_trains_with_ssr_depth_2(tmp_path):
    out = tmp_path / "var"
    r = toy.invoke("train", "-f", "var", "--tokenizer", VAR_FIX / "vae_ch32v64z8.pth",
                   "--backbone", VAR_FIX / "var_tiny_d2w64.pth", "--data", "digits", "--image-size", "64",
                   "--steps", "2", "--batch-size", "2", "--workers", "0", "--rollout", "ssr", "--ssr-depth", "2",
                   "--gamma", "0.1", "--lr", "1e-3", "--loggers", "jsonl", "--out", out)
    assert r.exit_code == 0, r.output
    rows = toy.read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2] and all(m["loss_csf"] > 0 for m in rows)
