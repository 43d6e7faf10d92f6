"""The family-agnostic SAR step: rollouts, CSF losses and the memory-lean backward."""

import copy
import random
from pathlib import Path

import pytest
import torch

from sar_core.losses import HardCSFL, NaiveStudentForcing, SoftCSFL
from sar_core.plugins import get_registry
from sar_core.rollouts import NoRollout, OfficialRollout, StaggerScaleRollout
from sar_core.sar_step import sar_step
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "flexvar"


@pytest.fixture(scope="module")
def setup():
    cls = get_registry().get("adapter", "flexvar")
    adapter = cls.load(FIX / "FlexVAE_tiny.pth", FIX / "FlexVARd2-tiny.pth")
    adapter.backbone.eval()
    adapter.backbone.cond_drop_rate = 0.0
    case = torch.load(FIX / "case.pt", weights_only=True)
    schedule = Schedule([1, 2, 3, 4, 6, 8])
    gt = adapter.encode(case["images"], schedule)
    return adapter, case["labels"], gt, schedule


def _grads(adapter, labels, gt, schedule, rollout, loss, lean: bool, seed=0):
    model = copy.deepcopy(adapter.backbone)
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    if lean:
        res = sar_step(adapter, model, labels, gt, schedule, rollout, loss, gamma=0.3,
                       generator=gen, rng=rng, backward=lambda l: l.backward())
    else:
        res = sar_step(adapter, model, labels, gt, schedule, rollout, loss, gamma=0.3,
                       generator=gen, rng=rng)
        res.total.backward()
    return res, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("rollout,loss", [
    (StaggerScaleRollout(scales="all"), HardCSFL()),
    (StaggerScaleRollout(scales="random", sampling="sample", top_k=8, cfg=1.5), SoftCSFL(temperature=2.0)),
    (OfficialRollout(sampling="argmax"), NaiveStudentForcing()),
    (OfficialRollout(top_k=16), HardCSFL()),
])
def test_memory_lean_backward_matches_single_backward(setup, rollout, loss):
    adapter, labels, gt, schedule = setup
    r1, g1 = _grads(adapter, labels, gt, schedule, rollout, loss, lean=True)
    r2, g2 = _grads(adapter, labels, gt, schedule, rollout, loss, lean=False)
    assert r1.student is not None and r1.loss_csf.item() > 0
    assert torch.allclose(r1.total, r2.total.detach(), atol=1e-6)
    assert g1.keys() == g2.keys() and len(g1) > 5
    for name in g1:
        assert torch.allclose(g1[name], g2[name], atol=1e-6, rtol=1e-5), name


def test_none_rollout_is_plain_teacher_forcing(setup):
    adapter, labels, gt, schedule = setup
    res = sar_step(adapter, adapter.backbone, labels, gt, schedule, NoRollout(), HardCSFL())
    assert res.student is None and res.pred_codes is None
    assert res.loss_csf.item() == 0.0
    assert torch.equal(res.total, res.loss_tf)


class _OracleRollout(StaggerScaleRollout):
    """Predicts the ground truth: stagger inputs must then equal teacher inputs."""

    def predict(self, adapter, logits_cond, logits_uncond, schedule, generator):
        return list(self._gt)


def test_ssr_with_perfect_predictions_reproduces_teacher_forcing(setup):
    adapter, labels, gt, schedule = setup
    ro = _OracleRollout(scales="all")
    ro._gt = gt
    with torch.no_grad():
        res = sar_step(adapter, adapter.backbone, labels, gt, schedule, ro, SoftCSFL())
    sp = res.student
    assert sp.scales == tuple(range(1, len(schedule)))
    assert sp.logits.shape[1] == schedule.total_tokens - schedule.first_len
    assert torch.allclose(sp.logits, sp.teacher_logits, atol=1e-5)
    assert res.loss_csf.abs().item() < 1e-6  # KL of identical distributions


def test_ssr_scale_choices(setup):
    adapter, labels, gt, schedule = setup
    K = len(schedule)
    last = StaggerScaleRollout(scales="last")
    assert last.transitions(schedule, random.Random(0)) == [K - 2]
    rnd = StaggerScaleRollout(scales="random")
    draws = {rnd.transitions(schedule, random.Random(s))[0] for s in range(40)}
    assert draws == set(range(K - 1))
    with torch.no_grad():
        res = sar_step(adapter, adapter.backbone, labels, gt, schedule, last, HardCSFL())
    assert res.student.scales == (K - 1,)
    assert res.student.logits.shape[1] == schedule.token_counts[-1]
    with pytest.raises(ValueError):
        StaggerScaleRollout(scales="bogus")


def test_official_rollout_short_pass_and_guided_rows(setup):
    adapter, labels, gt, schedule = setup
    ro = OfficialRollout(top_k=16)
    assert ro.uses_cfg
    with torch.no_grad():
        res = sar_step(adapter, adapter.backbone, labels, gt, schedule, ro, HardCSFL(),
                       generator=torch.Generator().manual_seed(1))
    B = labels.shape[0]
    assert res.tf_cond_rows == 2 * B
    assert res.student.schedule == Schedule([1, 8])
    assert res.student.logits.shape[:2] == (B, 64)
    assert all(p is None or p.shape == g.shape for p, g in zip(res.pred_codes, gt))
    assert [p is not None for p in res.pred_codes] == [False] * (len(gt) - 2) + [True, True]  # needed only
    with pytest.raises(ValueError):
        OfficialRollout(scales="all")
