"""The optimised SAR-step paths give today's gradients (within float tolerance).

Each fast path is compared with the reference path that stays in the code:
* CSF losses over the whole contiguous student logits vs over the sliced (B, n, V) view;
* ``ssr`` ``scales='last'`` with pass 1's prefix keys / values vs a full second pass;
* guided rollouts with the null rows as a no-grad forward vs upstream's joint 2B-row pass.
"""

import copy
import random
from pathlib import Path

import pytest
import torch

from sar_adapters.var import VARAdapter, VARConfig
from sar_core.sar.losses import HardCSFL, NaiveStudentForcing, SoftCSFL
from sar_core.plugins import get_registry
from sar_core.sar.rollouts import OfficialRollout, StaggerScaleRollout
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "flexvar"


@pytest.fixture(scope="module")
def flexvar():
    adapter = get_registry().get("adapter", "flexvar").load(FIX / "FlexVAE_tiny.pth", FIX / "FlexVARd2-tiny.pth")
    adapter.backbone.cond_drop_rate = 0.0
    for block in adapter.transformer_blocks():  # random layers differ between two passes by design
        block.drop_path.p = 0.0
    case = torch.load(FIX / "case.pt", weights_only=True)
    schedule = Schedule([1, 2, 3, 4, 6, 8])
    with torch.no_grad():
        gt = adapter.encode(case["images"], schedule)
    return adapter, case["labels"], gt, schedule


@pytest.fixture(scope="module")
def var_tiny():
    cfg = VARConfig(vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=2, embed_dim=32,
                    num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0,
                    drop_path_rate=0.0)  # random layers differ between two passes by design
    torch.manual_seed(0)
    adapter = VARAdapter.from_config(cfg)
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    with torch.no_grad():
        gt = adapter.encode(torch.rand(3, 3, h, w) * 2 - 1, schedule)
    return adapter, torch.tensor([0, 3, 4]), gt, schedule


class SlicedSSR(StaggerScaleRollout):
    """Reference: the CSF loss on the sliced view of the student logits (the old path)."""

    def student(self, *args, **kwargs):
        sp = super().student(*args, **kwargs)
        sp.full = sp.teacher_full = None
        return sp


class SlicedOfficial(OfficialRollout):
    def student(self, *args, **kwargs):
        sp = super().student(*args, **kwargs)
        sp.full = None
        return sp


def step_grads(setup, rollout, loss, lean=True, train=False, seed=0):
    adapter, labels, gt, schedule = setup
    model = copy.deepcopy(adapter.backbone).train(train)
    kw = dict(gamma=0.3, generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))
    if lean:
        res = sar_step(adapter, model, labels, gt, schedule, rollout, loss, backward=lambda l: l.backward(), **kw)
    else:
        res = sar_step(adapter, model, labels, gt, schedule, rollout, loss, **kw)
        res.total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return res, grads


def assert_same(a, b, atol=2e-6, rtol=1e-4):
    (ra, ga), (rb, gb) = a, b
    assert ra.loss_csf.item() > 0
    assert torch.allclose(ra.total.detach(), rb.total.detach(), atol=1e-6, rtol=1e-6)
    assert ga.keys() == gb.keys() and len(ga) > 5
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=atol, rtol=rtol), \
            f"{name}: max diff {(ga[name] - gb[name]).abs().max():.3g}"


@pytest.mark.parametrize("scales", ["all", "random"])
@pytest.mark.parametrize("loss", [HardCSFL(), SoftCSFL(temperature=2.0), NaiveStudentForcing()])
def test_csf_loss_on_full_logits_equals_sliced(flexvar, scales, loss):
    fast = step_grads(flexvar, StaggerScaleRollout(scales=scales, reuse_prefix=False), loss)
    assert fast[0].student is not None
    ref = step_grads(flexvar, SlicedSSR(scales=scales, reuse_prefix=False), loss)
    assert_same(fast, ref)


@pytest.mark.parametrize("loss", [HardCSFL(), SoftCSFL(temperature=0.5)])
def test_official_csf_loss_on_full_logits_equals_sliced(flexvar, loss):
    ro = dict(sampling="argmax")
    assert_same(step_grads(flexvar, OfficialRollout(**ro), loss), step_grads(flexvar, SlicedOfficial(**ro), loss))


@pytest.mark.parametrize("family", ["flexvar", "var_tiny"])
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("loss", [HardCSFL(), SoftCSFL()])
def test_ssr_last_prefix_reuse_equals_full_second_pass(request, family, lean, loss):
    setup = request.getfixturevalue(family)
    fast_ro = StaggerScaleRollout(scales="last")
    assert fast_ro.prefix_length(setup[0], setup[3]) == setup[3].offsets[-2]
    fast = step_grads(setup, fast_ro, loss, lean=lean, train=True)
    ref = step_grads(setup, SlicedSSR(scales="last", reuse_prefix=False), loss, lean=lean, train=True)
    n_last = setup[3].token_counts[-1]
    assert fast[0].student.logits.shape[1] == n_last
    assert torch.allclose(fast[0].student.logits, ref[0].student.logits, atol=1e-5)
    assert_same(fast, ref)


def _same_needed_preds(fast, ref, needed):
    for k, (a, b) in enumerate(zip(fast[0].pred_codes, ref[0].pred_codes)):
        assert (a is None) == (k not in needed) and b is not None
        assert a is None or torch.equal(a, b)


def test_ssr_last_prefix_reuse_with_guided_sampling(flexvar):
    # top-k 1: the draws are the argmax, so sampling only the needed scales (fast path) and
    # every scale (upstream-exact reference) must agree
    ro = dict(scales="last", sampling="sample", top_k=1, cfg=1.5)
    fast = step_grads(flexvar, StaggerScaleRollout(**ro), HardCSFL())
    ref = step_grads(flexvar, SlicedSSR(reuse_prefix=False, upstream_exact=True, **ro), HardCSFL())
    _same_needed_preds(fast, ref, {4, 5})
    assert_same(fast, ref)


@pytest.mark.parametrize("rollout_cls,options,needed", [
    (OfficialRollout, dict(top_k=1), {4, 5}),
    (OfficialRollout, dict(sampling="argmax"), {4, 5}),
    (StaggerScaleRollout, dict(scales="all", sampling="sample", top_k=1, cfg=2.0), set(range(6))),
])
def test_split_null_rows_equal_upstream_joint_pass(flexvar, rollout_cls, options, needed):
    split = step_grads(flexvar, rollout_cls(**options), HardCSFL())
    joint = step_grads(flexvar, rollout_cls(upstream_exact=True, **options), HardCSFL())
    assert split[0].tf_cond_rows == joint[0].tf_cond_rows
    assert rollout_cls(**options).joint_cfg is False
    assert rollout_cls(upstream_exact=True, **options).joint_cfg == rollout_cls(**options).uses_cfg
    _same_needed_preds(split, joint, needed)
    assert_same(split, joint)


def test_null_rows_carry_no_graph(flexvar):
    """The split path back-propagates through B rows only: the teacher logits the step
    keeps have B rows and pass 1 builds no graph for the null rows."""
    adapter, labels, gt, schedule = flexvar
    calls = []
    model = copy.deepcopy(adapter.backbone)

    def counting(*args, **kwargs):
        calls.append((args[0].shape[0], torch.is_grad_enabled()))
        return model(*args, **kwargs)

    sar_step(adapter, counting, labels, gt, schedule, OfficialRollout(top_k=16), HardCSFL(),
             generator=torch.Generator().manual_seed(0), backward=lambda l: l.backward())
    B = labels.shape[0]
    assert calls == [(B, True), (B, False), (B, True)]



@pytest.mark.parametrize("top_k,top_p", [(50, 0.0), (50, 0.9), (400, 0.96), (1, 0.5), (499, 0.3)])
def test_candidate_sampling_has_the_full_filters_distribution(top_k, top_p):
    from sar_core.sar.sampling import candidate_probs, filter_top_k_top_p, sample_candidates

    logits = torch.randn(3, 7, 500, generator=torch.Generator().manual_seed(top_k)) * 3
    want = filter_top_k_top_p(logits, top_k, top_p).float().softmax(-1)
    probs, idx = candidate_probs(logits, top_k, top_p)
    got = torch.zeros_like(want).scatter_(-1, idx, probs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    draws = sample_candidates(logits, top_k, top_p, torch.Generator().manual_seed(0))
    assert draws.shape == (3, 7) and bool((want.gather(-1, draws[..., None]) > 0).all())
    tied = torch.zeros(2, 10)
    assert candidate_probs(tied, 3) is None  # ties at the k-th value: the full filter decides


def test_inverse_cdf_draws_follow_the_probabilities_and_skip_zero_mass(monkeypatch):
    from sar_core.sar.sampling import inverse_cdf_draw

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 1.0, 0.0], [0.1, 0.0, 0.6, 0.3]])
    n = 40000
    draws = inverse_cdf_draw(probs.repeat(n, 1), torch.Generator().manual_seed(0)).view(n, 3)
    freq = torch.stack([torch.bincount(draws[:, r], minlength=4).float() / n for r in range(3)])
    assert bool((freq[probs == 0] == 0).all())                  # never an entry without mass
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)  # 4 sd of a 40k-draw frequency < 0.01
    # a uniform rounding onto the total falls back to the last entry with mass, never past it
    monkeypatch.setattr(torch, "rand", lambda n, m, **kw: torch.ones(n, m, dtype=kw.get("dtype")))
    assert inverse_cdf_draw(torch.tensor([[0.7, 0.3, 0.0, 0.0]])).item() == 1
