"""Per-block activation checkpointing: same gradients, fewer saved activations."""

import copy
import random
from pathlib import Path

import pytest
import torch

from sar_adapters.flexvar import FlexVARAdapter
from sar_adapters.var import VARAdapter, VARConfig
from sar_core.train.activation_ckpt import apply_activation_checkpointing, checkpoint_mode
from sar_core.sar.losses import HardCSFL
from sar_core.sar.rollouts import OfficialRollout, StaggerScaleRollout
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "flexvar"


def _var():
    cfg = VARConfig(vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=3, embed_dim=32,
                    num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.1, drop_path_rate=0.1)
    torch.manual_seed(0)
    return VARAdapter.from_config(cfg)


def _flexvar():
    adapter = FlexVARAdapter.load(FIX / "FlexVAE_tiny.pth", FIX / "FlexVARd2-tiny.pth")
    adapter.condition_dropout = 0.1
    return adapter


@pytest.fixture(scope="module", params=["var", "flexvar"])
def family(request):
    adapter = _var() if request.param == "var" else _flexvar()
    schedule = adapter.default_schedule if request.param == "var" else Schedule([1, 2, 3, 4, 6, 8])
    h, w = adapter.image_size(schedule)
    torch.manual_seed(1)
    with torch.no_grad():
        gt = adapter.encode(torch.rand(2, 3, h, w) * 2 - 1, schedule)
    return adapter, torch.tensor([1, 3]), gt, schedule


def _run(setup, mode, rollout, seed=0):
    """One lean SAR step in train mode (dropout and drop-path active); grads + saved bytes."""
    adapter, labels, gt, schedule = setup
    adapter = copy.copy(adapter)
    adapter.backbone = copy.deepcopy(adapter.backbone).train()
    assert apply_activation_checkpointing(adapter.transformer_blocks(), mode) == \
        (0 if mode == "none" else len(adapter.transformer_blocks()))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sar_step(adapter, adapter.backbone, labels, gt, schedule, rollout, HardCSFL(), gamma=0.5,
                 generator=torch.Generator().manual_seed(seed), rng=random.Random(seed),
                 backward=lambda l: l.backward())
    grads = {n: p.grad for n, p in adapter.backbone.named_parameters() if p.grad is not None}
    return grads, sum(saved), adapter


@pytest.mark.parametrize("rollout", [StaggerScaleRollout(scales="all"), StaggerScaleRollout(scales="last"),
                                     OfficialRollout(top_k=8)], ids=["ssr-all", "ssr-last-prefix", "official"])
def test_checkpointing_keeps_gradients_and_saves_memory(family, rollout):
    ref, saved_none, _ = _run(family, "none", rollout)
    for mode in ("full", "selective"):
        grads, saved, adapter = _run(family, mode, rollout)
        assert all(checkpoint_mode(b) == mode for b in adapter.transformer_blocks())
        assert grads.keys() == ref.keys() and len(ref) > 5
        for name in ref:
            assert torch.allclose(grads[name], ref[name], atol=1e-6, rtol=1e-5), (mode, name)
        assert saved < saved_none, (mode, saved, saved_none)
        if mode == "full":
            saved_full = saved
    assert saved_full < saved  # selective keeps matmul outputs: between full and none


def test_checkpointing_keeps_state_dict_and_sampling(family):
    adapter, labels, _, schedule = family
    model = copy.copy(adapter)
    model.backbone = copy.deepcopy(adapter.backbone)
    keys = list(model.backbone.state_dict())
    apply_activation_checkpointing(model.transformer_blocks(), "full")
    assert list(model.backbone.state_dict()) == keys
    with torch.no_grad(), model.inference():
        a = model.generate(labels, schedule, cfg=1.5, top_k=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter.inference():
        b = adapter.generate(labels, schedule, cfg=1.5, top_k=4, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    apply_activation_checkpointing(model.transformer_blocks(), "none")
    assert all(checkpoint_mode(b) == "none" and "forward" not in b.__dict__ for b in model.transformer_blocks())


def test_bad_mode_and_family_without_blocks():
    with pytest.raises(ValueError, match="one of none, full, selective"):
        apply_activation_checkpointing([torch.nn.Linear(2, 2)], "some")
    with pytest.raises(ValueError, match="lists no transformer blocks"):
        apply_activation_checkpointing([], "full")
    assert apply_activation_checkpointing([], "none") == 0
