"""SAR on bits through the family-agnostic core, Bitwise Self-Correction, and the golden case."""

import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sar_adapters.infinity import InfinityAdapter
from sar_adapters.infinity.bsq import BitCodes, next_inputs
from sar_core.sar.losses import HardCSFL, NaiveStudentForcing, SoftCSFL
from sar_core.sar.rollouts import OfficialRollout, StaggerScaleRollout
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "infinity"


@pytest.fixture(scope="module")
def inf():
    return InfinityAdapter.load(FIX / "infinity_vae_d16_tiny.pth", FIX / "infinity_tiny_d4c4w64.pth")


@pytest.fixture(scope="module")
def case():
    return torch.load(FIX / "case.pt", weights_only=True)


def _cond(inf, case):
    return inf.text_condition(case["text_kv_compact"], case["text_lens"])


def test_stagger_inputs_rebuild_the_sampler_input(inf, case):
    sch = Schedule(case["scale_schedule"])
    gt = [b.long() for b in case["gt_bits"]]
    pred = [1 - b for b in gt]
    x_tf = inf.teacher_inputs(gt, sch)
    assert torch.allclose(x_tf, case["x_BLC_wo_prefix"], atol=1e-6)
    x = inf.stagger_inputs(gt, pred, sch, [2])
    same = [k for k in range(1, len(sch)) if k != 3]
    for k in same:   # only the input of scale 3 (built from the prediction at 2) changes
        sl = slice(sch.offsets[k] - 1, sch.offsets[k + 1] - 1)
        assert torch.equal(x[:, sl], x_tf[:, sl])
    mixed = gt[:2] + [pred[2]] + gt[3:]
    sl3 = slice(sch.offsets[3] - 1, sch.offsets[4] - 1)
    assert torch.allclose(x[:, sl3], next_inputs(mixed, sch)[:, sl3], atol=1e-6)
    assert not torch.allclose(x[:, sl3], x_tf[:, sl3])


ROLLOUTS = {"ssr": lambda: StaggerScaleRollout(), "ssr-sampled": lambda: StaggerScaleRollout("sample", 0, 0.97, 3.0),
            "official": lambda: OfficialRollout()}
LOSSES = {"hard": HardCSFL, "soft": SoftCSFL, "naive": NaiveStudentForcing}


@pytest.mark.parametrize("rollout", list(ROLLOUTS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_sar_step_on_bits_every_rollout_and_loss(inf, case, rollout, loss):
    sch = Schedule(case["scale_schedule"])
    inf.backbone.train()
    inf.config.bsc_layers = 4 if loss == "hard" else 0   # BSC composes with SAR
    try:
        gt = inf.encode(case["images"], sch)
        assert isinstance(gt, BitCodes) and (gt.history is not None) == (loss == "hard")
        model = inf.backbone
        model.zero_grad(set_to_none=True)
        ro = ROLLOUTS[rollout]()
        res = sar_step(inf, model, _cond(inf, case), gt, sch, ro, LOSSES[loss](), gamma=0.5,
                       generator=torch.Generator().manual_seed(0), rng=random.Random(0))
        res.total.backward()
    finally:
        inf.config.bsc_layers = 0
        inf.backbone.eval()
    assert torch.isfinite(res.loss_tf) and torch.isfinite(res.loss_csf) and res.loss_csf > 0
    sp = res.student
    assert sp.teacher_codes.shape[-1] == 16 and sp.logits.shape[-1] == 32
    assert set(sp.teacher_codes.unique().tolist()) <= {0, 1}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


def test_bsc_reproduces_the_case_and_feeds_the_inputs(inf, case):
    sch = Schedule(case["scale_schedule"])
    masks = case["bsc_flip_masks"]
    q = inf.quantise(case["raw_features"], sch, flip_masks=masks)
    assert all(torch.equal(a, b.long()) for a, b in zip(q.labels, case["bsc_gt_bits"]))
    assert torch.allclose(q.inputs, case["bsc_x_BLC_wo_prefix"], atol=1e-6)
    codes = BitCodes(q.labels, q.history)
    assert torch.allclose(inf.teacher_inputs(codes, sch), case["bsc_x_BLC_wo_prefix"], atol=1e-6)
    # flipped history at the noised scales, clean labels there
    for k, m in enumerate(masks):
        assert torch.equal(q.history[k] ^ q.labels[k], m.long())
    assert not torch.allclose(q.inputs, case["x_BLC_wo_prefix"])


def test_bsc_draws_are_seeded_and_off_in_eval(inf, case):
    import numpy as np

    sch = Schedule(case["scale_schedule"])
    inf.config.bsc_layers = 3
    try:
        assert inf.encode(case["images"], sch).history is None           # eval mode: clean codes
        inf.backbone.train()
        np.random.seed(1), torch.manual_seed(1)
        a = inf.encode(case["images"], sch)
        np.random.seed(1), torch.manual_seed(1)
        b = inf.encode(case["images"], sch)
    finally:
        inf.config.bsc_layers = 0
        inf.backbone.eval()
    assert all(torch.equal(x, y) for x, y in zip(a.history, b.history))


def test_condition_dropout_and_null_rows(inf, case):
    cond = _cond(inf, case)
    bb = inf.backbone
    kv, _ = bb.text_rows(inf.null_condition(cond))
    assert torch.equal(kv, case["uncond_kv_compact"])
    assert torch.equal(cond["kv_compact"], case["text_kv_compact"])   # the caller's tensor is untouched
    both = inf.cfg_condition(cond)
    assert both["lens"].tolist() == [7, 12, 7, 12] and both["null"].tolist() == [False, False, True, True]
    inf.condition_dropout = 1.0
    bb.train()
    try:
        kv_drop, _ = bb.text_rows(cond)
    finally:
        bb.eval()
        inf.condition_dropout = 0.1
    assert torch.equal(kv_drop, case["uncond_kv_compact"])


def test_inputs_only_case_is_computed_and_dumped(tmp_path):
    from sar_cli.main import app

    case_dir = tmp_path / "inf"
    shutil.copytree(FIX, case_dir)
    full = torch.load(FIX / "case.pt", weights_only=True)
    keep = ("images", "scale_schedule", "text_kv_compact", "text_lens")
    torch.save({k: full[k] for k in keep}, case_dir / "case.pt")
    dump = tmp_path / "dump.pt"
    res = CliRunner().invoke(app, ["conformance", str(case_dir), "--dump", str(dump)])
    assert res.exit_code == 0, res.output
    out = torch.load(dump, weights_only=True)
    for k in ("gt_bits", "tf_logits", "infer_bits", "bsc_gt_bits", "bsc_flip_masks", "infer_image_uint8_bgr"):
        assert k in out, k
    assert all(torch.equal(a.long(), b.long()) for a, b in zip(out["infer_bits"], full["infer_bits"]))
    assert torch.allclose(out["tf_logits"], full["tf_logits"], atol=1e-4)
