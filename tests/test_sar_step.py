"""Rollout choices of the family-agnostic SAR step on a real FlexVAR checkpoint.

The properties every adapter must give (finite losses and gradients for every rollout x
loss, memory-lean backward == single backward, perfect predictions == teacher forcing)
are in the contract suite (``sar_core.testing``, run by tests/test_contract.py)."""

import random
from pathlib import Path

import pytest
import torch

from sar_core.sar.losses import HardCSFL
from sar_core.plugins import get_registry
from sar_core.sar.rollouts import NoRollout, OfficialRollout, StaggerScaleRollout
from sar_core.sar.step import sar_step
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


def test_none_rollout_is_plain_teacher_forcing(setup):
    adapter, labels, gt, schedule = setup
    res = sar_step(adapter, adapter.backbone, labels, gt, schedule, NoRollout(), HardCSFL())
    assert res.student is None and res.pred_codes is None
    assert res.loss_csf.item() == 0.0
    assert torch.equal(res.total, res.loss_tf)


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
