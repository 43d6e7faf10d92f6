"""Distributed training on CPU (gloo, loopback): DDP and FSDP2 gradients equal one process
on the whole batch; `torchrun` end to end writes from rank 0 only (FSDP2's checkpoints: every
rank its shards, see test_dcp_checkpoint.py)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sar_core.train.config import build_config
from sar_core.train.trainer import Trainer

import toy_adapter as toy
from cli_asserts import free_port as _free_port

HERE = Path(__file__).parent

# class dropout and dropout off (their draws differ between 1 and 2 processes); random
# flips on: the data are seeded per item, so they agree
RUNS = {
    "ssr-ddp": ({"name": "ssr", "scales": "all"}, "ddp", 1),
    "official-ddp-accum": ({"name": "official", "sampling": "argmax"}, "ddp", 2),
    "none-ddp": ({"name": "none"}, "ddp", 1),
    "ssr-fsdp": ({"name": "ssr", "scales": "last"}, "fsdp", 1),
    "ssr-depth-ddp-accum": ({"name": "ssr", "scales": "all", "depth": 2}, "ddp", 2),
}


def _config(tmp: Path, name: str, rollout: dict, strategy: str, accum: int) -> dict:
    return {"model": {"family": "toy", "overrides": {"depth": 2}}, "data": {"name": "toy-images", "workers": 0},
            "rollout": rollout, "loss": {"name": "hard", "gamma": 0.5},
            "train": {"batch_size": 8, "grad_accum": accum, "loggers": [], "seed": 3},
            "dist": {"strategy": strategy}, "out": str(tmp / name)}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grads_and_update(tr: Trainer) -> dict:
    sums = tr.forward_backward()
    grads = {n: _full(p.grad).detach().clone() for n, p in tr.backbone.named_parameters()}
    tr._update(False)
    params = {n: _full(p).detach().clone() for n, p in tr.backbone.named_parameters()}
    return {"grads": grads, "params": params, "sums": sums.cpu()}


def _worker(rank: int, world: int, port: int, tmp: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    reg = toy.make_registry()
    for name, (rollout, strategy, accum) in RUNS.items():
        tr = Trainer(build_config(_config(Path(tmp), name, rollout, strategy, accum)), registry=reg,
                     log=lambda m: None)
        assert tr.env.world_size == world and tr.micro_batch == 8 // (world * accum)
        res = _grads_and_update(tr)
        torch.save(res, Path(tmp) / f"{name}-rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()




@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    return tmp


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_match_one_process_on_the_doubled_batch(two_rank_results, tmp_path, name):
    rollout, strategy, accum = RUNS[name]
    reg = toy.make_registry()
    r0, r1 = (torch.load(two_rank_results / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1))
    # one process, the whole batch of 8 in one micro-step
    tr = Trainer(build_config(_config(tmp_path, name, rollout, strategy, 1)), registry=reg, log=lambda m: None)
    assert tr.env.world_size == 1 and tr.micro_batch == 8
    ref = _grads_and_update(tr)
    # mean TF loss of the 2 ranks (x accumulation) equals the big batch's
    n = 2 * accum
    assert r0["sums"][0] / n == pytest.approx(ref["sums"][0].item(), rel=1e-5)
    assert ref["grads"].keys() == r0["grads"].keys()
    nonzero = 0
    for n, g in ref["grads"].items():
        assert torch.allclose(r0["grads"][n], g, atol=2e-6, rtol=1e-4), n
        assert torch.equal(r0["grads"][n], r1["grads"][n]), n  # synced
        nonzero += int(g.abs().sum() > 0)
        assert torch.equal(r0["params"][n], r1["params"][n]), n  # same update on both ranks
    assert nonzero >= len(ref["grads"]) - 1
    if name.startswith("official"):  # the start position only gets its gradient from pass 1
        assert ref["grads"]["pos_start"].abs().sum() > 0


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_end_to_end_writes_from_rank_zero_only(tmp_path, strategy):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(HERE / "toy_adapter.py"), "train", "-f", "toy", "--random-tokenizer", "--data",
           "toy-images", "--steps", "2", "--batch-size", "4", "--workers", "0", "--dist", strategy,
           "--rollout", "official" if strategy == "ddp" else "ssr", "--ema", "0.9",
           "--loggers", "jsonl,console", "--log-every", "1", "--out", str(out),
           *(["--eval-every", "1", "--eval-images", "4", "--set", "eval.grid=2"] if strategy == "ddp" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=HERE.parent)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = toy.read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]  # one line per step, not one per rank
    assert p.stdout.count("step 2/2") == 1 and p.stdout.count("trained 2 steps") == 1
    if strategy == "ddp":  # evals on rank 0 alone while the other rank waits in the next step
        evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [1, 2] and p.stdout.count("eval at step 2 (") == 1
    from sar_core.train import checkpointing as ckpt

    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert ckpt.is_sharded(latest) == (strategy == "fsdp")  # FSDP2: a DCP folder, DDP: one file
    state = ckpt.load_full(latest)
    assert state["data"]["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank streams
    # full (unsharded) weights in the checkpoint and in the upstream-layout exports
    tok, _ = toy.toy_files(tmp_path)
    model = toy.ToyAdapter.load(tok, out / "backbone.pth").backbone.state_dict()
    ema = toy.ToyAdapter.load(tok, out / "backbone_ema.pth").backbone.state_dict()
    assert model.keys() == state["model"].keys()
    assert all(torch.equal(model[k], state["model"][k]) for k in model)
    assert all(torch.equal(ema[k], state["ema"]["shadow"][k]) for k in state["ema"]["shadow"])
    assert not torch.equal(ema["head.weight"], model["head.weight"])
