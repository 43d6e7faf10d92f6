"""The fast SAR-step paths under DDP and FSDP2 (2 gloo ranks on CPU): prefix reuse (one
backward over two forwards), no-grad null rows and activation checkpointing give the
gradients of one process on the whole batch."""

import copy
import os
import random
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sar_adapters.var import VARAdapter, VARConfig
from sar_core.train import distributed as D
from sar_core.train.activation_ckpt import apply_activation_checkpointing
from sar_core.sar.losses import HardCSFL
from sar_core.sar.rollouts import OfficialRollout, StaggerScaleRollout
from sar_core.sar.step import sar_step

CASES = {  # name -> (strategy, rollout, checkpointing)
    "ddp-ssr-last-selective": ("ddp", lambda: StaggerScaleRollout(scales="last"), "selective"),
    "ddp-official-guided-full": ("ddp", lambda: OfficialRollout(top_k=1), "full"),
    "fsdp-ssr-last-full": ("fsdp", lambda: StaggerScaleRollout(scales="last"), "full"),
}


def _setup():
    cfg = VARConfig(vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=2, embed_dim=32,
                    num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0, drop_path_rate=0.0)
    torch.manual_seed(0)
    adapter = VARAdapter.from_config(cfg)
    schedule = adapter.default_schedule
    h, w = adapter.image_size(schedule)
    with torch.no_grad():
        gt = adapter.encode(torch.rand(4, 3, h, w) * 2 - 1, schedule)
    return adapter, torch.tensor([0, 1, 3, 4]), gt, schedule


def _grads(adapter, module, model, labels, gt, schedule, rollout, sync=None):
    run = sync.micro(True, 2) if sync is not None else model
    sar_step(adapter, run, labels, gt, schedule, rollout, HardCSFL(), gamma=0.5,
             generator=torch.Generator().manual_seed(0), rng=random.Random(0), backward=lambda l: l.backward())
    if sync is not None:
        sync.finish()
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = D.DistEnv(rank=rank, world_size=world)
    adapter, labels, gt, schedule = _setup()
    rows = slice(2 * rank, 2 * rank + 2)
    res = {}
    for name, (strategy, make_rollout, ckpt) in CASES.items():
        module = copy.deepcopy(adapter.backbone).train()
        local = copy.copy(adapter)
        local.backbone = module
        apply_activation_checkpointing(local.transformer_blocks(), ckpt)
        rollout = make_rollout()
        model = D.wrap_model(module, env, strategy, find_unused=rollout.skips_parameters)
        sync = D.GradSync(model, module, env)
        res[name] = _grads(local, module, model, labels[rows], [g[rows] for g in gt], schedule, rollout, sync)
    if rank == 0:
        torch.save(res, Path(out) / "dist.pt")
    dist.barrier()
    dist.destroy_process_group()


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_grads(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf-dist")
    mp.spawn(_worker, args=(2, _port(), str(out)), nprocs=2, join=True)
    return torch.load(out / "dist.pt", weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_process(dist_grads, name):
    strategy, make_rollout, ckpt = CASES[name]
    adapter, labels, gt, schedule = _setup()
    module = copy.deepcopy(adapter.backbone).train()
    ref = _grads(adapter, module, module, labels, gt, schedule, make_rollout())
    got = dist_grads[name]
    assert got.keys() == ref.keys() and len(ref) > 5
    for n in ref:
        # the rollout loss is a mean over the whole batch: two ranks' averaged halves
        assert torch.allclose(got[n], ref[n], atol=1e-6, rtol=1e-4), (name, n, (got[n] - ref[n]).abs().max())
