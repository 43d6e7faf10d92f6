"""Run config, optimizer groups, learning-rate schedule, EMA, data stream."""

import math

import pytest
import torch

from sar_core.train.config import ConfigError, OptimConfig, build_config, parse_set, parse_value
from sar_core.data.datasets import BatchStream, SeededItems
from sar_core.batch import collate
from sar_core.train.ema import EMA
from sar_core.train.optim import build_optimizer, lr_at, param_groups

import toy_adapter as toy


def test_param_groups_follow_the_no_decay_rule():
    torch.manual_seed(0)
    adapter = toy.ToyAdapter.from_config(toy.ToyConfig())
    groups = param_groups(adapter.backbone, 0.05, adapter.no_decay_keywords)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    rest = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    named = dict(adapter.backbone.named_parameters())
    assert decay | rest == set(named) and not decay & rest
    assert "head.weight" in decay and "word_embed.weight" in decay
    assert "head.bias" in rest and "head_norm.weight" in rest  # bias, 1-D
    assert "pos_start" in rest and "lvl_embed.weight" in rest and "class_emb.weight" in rest  # keywords
    assert all(named[n].ndim >= 2 for n in decay)
    with pytest.raises(ValueError, match="optim.lr is unset"):  # its default needs the run's batch size
        build_optimizer(adapter.backbone, OptimConfig(), adapter.no_decay_keywords)
    opt = build_optimizer(adapter.backbone, OptimConfig(lr=1e-4, weight_decay=0.05), adapter.no_decay_keywords)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]


def test_lr_schedule_warmup_hold_and_decay():
    total = 101
    cfg = OptimConfig(lr=1.0, warmup_steps=10, warmup_start=0.1)
    assert lr_at(0, total, cfg) == pytest.approx(0.1)
    assert lr_at(5, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(lr_at(s, total, cfg) == 1.0 for s in range(10, total))  # constant
    lin = OptimConfig(lr=1.0, lr_end=0.1, warmup_steps=10, hold_fraction=0.1)
    assert lin.schedule_kind == "linear"
    hold_end = 10 + round(0.1 * 91)
    assert lr_at(hold_end, total, lin) == 1.0
    assert lr_at(total - 1, total, lin) == pytest.approx(0.1)
    vals = [lr_at(s, total, lin) for s in range(hold_end, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    mid = (hold_end + total - 1) / 2
    assert lr_at(int(mid), total, lin) == pytest.approx(1.0 - 0.9 * (int(mid) - hold_end) / (total - 1 - hold_end))
    cos = OptimConfig(lr=1.0, lr_end=0.0, lr_schedule="cosine")
    assert lr_at(0, 11, cos) == 1.0 and lr_at(10, 11, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, 11, cos) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_end"):
        OptimConfig(lr=1.0, lr_end=0.5, lr_schedule="constant")


def test_ema_tracks_and_round_trips():
    net = torch.nn.Linear(3, 2)
    ema = EMA(net, 0.5)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)
    for n, p in net.named_parameters():
        assert torch.allclose(ema.shadow[n], before[n] + 0.5)
    other = EMA(torch.nn.Linear(3, 2), 0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with ema.swap_into(net):
        assert torch.allclose(net.weight, before["weight"] + 0.5)
    assert torch.allclose(net.weight, before["weight"] + 1.0)


def test_config_overrides_and_errors():
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "x"}},
                       {"optim.lr": parse_value("3e-4"), "rollout.top_k": 900, "train.loggers": ["jsonl"]})
    assert cfg.optim.lr == 3e-4 and cfg.rollout.top_k == 900 and cfg.loss.gamma == 0.5
    assert cfg.rollout.options() == {"top_k": 900}
    assert parse_set(["a.b=[1, 2]", "c=true"]) == {"a.b": [1, 2], "c": True}
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"family": "toy"}}, {"train.steps": 0, "optim.lrr": 1, "train.amp": "fp17"})
    msg = str(err.value)
    assert "data: Field required" in msg and "train.steps" in msg and "optim.lrr: unknown field" in msg
    assert "train.amp" in msg and "'fp17'" in msg
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["optim.lr"])


def test_batch_stream_resumes_mid_epoch_with_identical_items():
    data = toy.ToyImages(n=10, image_size=4, hflip=True)
    a = BatchStream(data, micro_batch=3, rank=0, world_size=1, seed=7)
    seq = [a.next() for _ in range(7)]  # 3 batches per epoch: crosses two epoch boundaries
    assert a.batches_per_epoch == 3 and a.epoch == 2
    b = BatchStream(data, micro_batch=3, rank=0, world_size=1, seed=7, workers=2)
    b.set_position(1, 1)
    for want in seq[4:]:
        got = b.next()
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    # flips really happen, and differ between epochs
    assert not torch.equal(seq[0].images, seq[3].images)


def test_seeded_items_do_not_touch_the_callers_rng():
    items = SeededItems(toy.ToyImages(n=4, image_size=4), seed=3)
    torch.manual_seed(0)
    x1 = items[(0, 1)][0]
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(items[(0, 1)][0], x1) and torch.equal(torch.rand(3), after)
    batch = collate([([torch.tensor([1]), torch.tensor([2, 3])], 4), ([torch.tensor([5]), torch.tensor([6, 7])], 8)])
    assert batch.images is None and batch.codes[1].tolist() == [[2, 3], [6, 7]] and batch.labels.tolist() == [4, 8]
    assert math.isfinite(float(batch.labels.sum()))
