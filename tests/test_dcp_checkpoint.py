"""Sharded (DCP) checkpoints of FSDP2 runs, 2 gloo ranks on CPU: each rank writes its own
shards; a resume at 2 ranks continues bit-exactly like the uninterrupted run; a resume in
one process equals, bit for bit, one from the same state gathered into a classic (unsharded)
checkpoint; a failed or killed save leaves the previous checkpoint usable; the DCP index
is unpickled safely."""

import copy
import errno
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import WriteError
from sar_core.train import checkpointing as ckpt
from sar_core.train import sharded_ckpt
from sar_core.train.config import build_config
from sar_core.train.distributed import DistEnv
from sar_core.train.trainer import Trainer

import toy_adapter as toy
from cli_asserts import free_port as _free_port

STEPS = 4
LOSSES = ("loss", "loss_tf", "loss_csf", "grad_norm")


def _config(out: Path, resume: bool = False) -> dict:
    # dropout on: the per-rank torch RNG streams must resume exactly too
    return {"model": {"family": "toy", "overrides": {"depth": 2, "dropout": 0.1}},
            "data": {"name": "toy-images", "workers": 0},
            "rollout": {"name": "ssr", "scales": "last"}, "loss": {"name": "hard", "gamma": 0.5},
            "train": {"batch_size": 8, "steps": STEPS, "save_every": 2, "keep_last": 5, "ema": 0.9,
                      "loggers": ["jsonl"], "seed": 3},
            "dist": {"strategy": "fsdp"}, "out": str(out), "resume": resume}


def _copy_run(src: Path, dst: Path, keep_step: int) -> None:
    """``src``'s run folder without its exports and checkpoints after ``keep_step``."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("backbone*", ".lock"))
    for step, path in ckpt.list_checkpoints(dst / "checkpoints"):
        if step > keep_step:
            ckpt.remove_checkpoint(path)


class _Recording(Trainer):
    """Also writes each checkpoint's state gathered the classic way (the unsharded reference)."""

    ref_dir: Path

    def save(self, snapshot=None):
        path = super().save(snapshot)
        full = self.state_dict(snapshot)  # gathered on rank 0
        if self.env.is_main:
            ckpt.save_checkpoint(full, self.ref_dir, self.step, keep_last=10)
        return path


def _without_gathers(fn, *args):
    """``fn(*args)`` where gathering a whole tensor (or a full state dict) fails."""
    from unittest import mock

    from torch.distributed.tensor import DTensor

    from sar_core.train import distributed as D

    def refuse(*a, **k):
        raise AssertionError("a sharded save gathered a whole tensor")

    with mock.patch.object(DTensor, "full_tensor", refuse), mock.patch.object(D, "model_state", refuse), \
            mock.patch.object(D, "optimizer_state", refuse):
        return fn(*args)


def _worker(rank: int, world: int, port: int, tmp: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    tmp, reg = Path(tmp), toy.make_registry()
    tr = _Recording(build_config(_config(tmp / "F")), registry=reg, log=lambda m: None)
    tr.ref_dir = tmp / "ref"
    assert tr.checkpointer.sharded and tr.run().status == "finished"
    if rank == 0:
        _copy_run(tmp / "F", tmp / "E", keep_step=2)
    dist.barrier()
    tr = Trainer(build_config(_config(tmp / "E", resume=True)), registry=reg, log=lambda m: None)
    save = tr.checkpointer._save_sharded
    tr.checkpointer._save_sharded = lambda *a: _without_gathers(save, *a)
    assert tr.run().status == "finished" and tr.step == STEPS
    dist.barrier()
    dist.destroy_process_group()




@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True)
    return tmp


def _assert_trees_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
        return
    assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys(), where
    for k in a:
        _assert_trees_equal(a[k], b[k], f"{where}/{k}")


def _plain(x):
    """Tuples as lists (betas: a tuple in the optimizer, a list where FSDP2 gathered it)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return [_plain(v) for v in x] if isinstance(x, (list, tuple)) else x


def _assert_same_training_state(a: dict, b: dict) -> None:
    _assert_trees_equal(a["model"], b["model"], "model")
    _assert_trees_equal(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
    assert _plain(a["optimizer"]["param_groups"]) == _plain(b["optimizer"]["param_groups"])
    _assert_trees_equal(a["ema"]["shadow"], b["ema"]["shadow"], "ema")


def _losses(out: Path, steps) -> list:
    rows = {r["step"]: r for r in toy.read_metrics(out)}
    return [[rows[s][k] for k in LOSSES] for s in steps]


def test_fsdp_checkpoints_are_sharded_folders_equal_to_the_gathered_state(world2):
    found = ckpt.list_checkpoints(world2 / "F" / "checkpoints")
    assert [s for s, _ in found] == [2, 4] and all(ckpt.is_sharded(p) for _, p in found)
    folder = found[-1][1]
    assert sorted(f.name for f in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    assert not [p for p in (world2 / "F" / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left
    payload = ckpt.load_checkpoint(folder)
    assert payload["sharded"] == ["ema", "model", "optimizer"] and "model" not in payload
    assert payload["data"]["world_size"] == 2 and len(payload["rng"]) == 2
    for step in (2, 4):  # read whole in one process = gathered by FSDP at save time
        _assert_same_training_state(ckpt.load_full(ckpt.sharded_path(world2 / "F" / "checkpoints", step)),
                                    ckpt.load_checkpoint(world2 / "ref" / f"step_{step:08d}.pt"))
    # the final export is the upstream layout, from the gathered weights
    tok, _ = toy.toy_files(world2)
    exported = toy.ToyAdapter.load(tok, world2 / "F" / "backbone.pth").backbone.state_dict()
    _assert_trees_equal(exported, ckpt.load_full(folder)["model"])


def test_resume_at_two_ranks_is_bit_exact(world2):
    assert _losses(world2 / "E", range(1, STEPS + 1)) == _losses(world2 / "F", range(1, STEPS + 1))
    e, f = (ckpt.load_full(ckpt.sharded_path(world2 / run / "checkpoints", STEPS)) for run in ("E", "F"))
    _assert_same_training_state(e, f)
    for a, b in zip(e["rng"], f["rng"], strict=True):  # every rank's streams continued alike
        assert torch.equal(a["torch"], b["torch"]) and torch.equal(a["generator"], b["generator"])


def _world1(out: Path, resume: bool = True) -> Trainer:
    return Trainer(build_config(_config(out, resume)), registry=toy.make_registry(), env=DistEnv(),
                   log=lambda m: None)


def test_resume_in_one_process_equals_the_unsharded_checkpoint(world2, tmp_path):
    sharded, classic = tmp_path / "C", tmp_path / "D"
    _copy_run(world2 / "F", sharded, keep_step=2)
    _copy_run(world2 / "F", classic, keep_step=0)
    shutil.copy(world2 / "ref" / "step_00000002.pt", classic / "checkpoints")
    states = []
    for out in (sharded, classic):  # one after the other: the torch RNG is process-wide
        tr = _world1(out)
        assert not tr.checkpointer.sharded and tr.resume() and tr.step == 2
        states.append(copy.deepcopy(tr.state_dict()))  # training goes on in place
        assert tr.run().status == "finished"
    _assert_same_training_state(*states)  # DCP resharded 2 ranks -> 1, exactly the gathered state
    assert _losses(sharded, [3, 4]) == _losses(classic, [3, 4])
    cs, ds = (ckpt.load_checkpoint(ckpt.latest_checkpoint(run / "checkpoints")) for run in (sharded, classic))
    assert ckpt.latest_checkpoint(sharded / "checkpoints").name == "step_00000004.pt"  # one process: one file
    _assert_trees_equal(cs["model"], ds["model"])
    _assert_trees_equal(cs["optimizer"]["state"], ds["optimizer"]["state"])
    _assert_trees_equal(cs["ema"]["shadow"], ds["ema"]["shadow"])


# ----------------------------------------------------------------------------- crash mid-save
def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(4, 3, generator=g)}, "optimizer": {"w": {"step": torch.tensor(1.0)}}}


def test_a_failed_or_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemWriter

    d, env = tmp_path / "checkpoints", DistEnv()
    ckpt.save_sharded_checkpoint(_tensors(0), {"data": {"epoch": 0}}, d, 2, keep_last=3, env=env)

    def full_disk(self, *args, **kwargs):
        (Path(self.path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(WriteError, match="no space left on device"):
        ckpt.save_sharded_checkpoint(_tensors(1), {"data": {"epoch": 1}}, d, 4, keep_last=3, env=env)
    monkeypatch.undo()
    assert [p.name for p in d.iterdir()] == ["step_00000002.dcp"]  # temp folder removed
    # a killed save leaves its temp folder (here: shards written, no state.pt, not renamed)
    tmp = d / ".step_00000004.dcp.k1ll3d.tmp"
    shutil.copytree(d / "step_00000002.dcp", tmp)
    (tmp / "state.pt").unlink()
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [2]
    latest = ckpt.load_latest(d)
    assert latest["step"] == 2 and latest["data"] == {"epoch": 0}
    _assert_trees_equal(ckpt.load_full(latest["path"])["model"], _tensors(0)["model"])
    assert ckpt.clean_interrupted_writes(d) == [tmp] and not tmp.exists()


# ----------------------------------------------------------------------------- untrusted input
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_the_index_is_not_unpickled_blindly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "checkpoints"
    ckpt.save_sharded_checkpoint(_tensors(0), {}, d, 2, keep_last=3, env=DistEnv())
    folder = ckpt.sharded_path(d, 2)
    index = folder / ".metadata"
    good = index.read_bytes()
    index.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="posix.system|os.system"):
        ckpt.load_checkpoint(folder)
    assert not (tmp_path / "PWNED").exists()
    # a data file outside the folder
    md = pickle.loads(good)
    for info in md.storage_data.values():
        info.relative_path = "../../x.distcp"
    index.write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="not a file of the checkpoint folder"):
        ckpt.load_full(folder)


def test_non_tensor_entries_are_refused(tmp_path):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step_00000002.dcp"
    dcp.save({"model/w": torch.zeros(2), "model/obj": {"any": "object"}}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 2, "sharded": ["model"]}, folder / "state.pt")
    with pytest.raises(CheckpointError, match="not tensors"):
        ckpt.load_full(folder)


# ----------------------------------------------------------------------------- offline export
def test_export_checkpoint_writes_the_upstream_layout_of_any_checkpoint(world2, tmp_path, monkeypatch):
    from sar_core import plugins

    from cli_asserts import one_error_line

    monkeypatch.setattr(plugins, "_REGISTRY", toy.make_registry())
    tok, _ = toy.toy_files(tmp_path)
    run = world2 / "F"
    r = toy.invoke("export-checkpoint", run, "--out", tmp_path / "last")  # a run folder: its newest
    assert r.exit_code == 0, r.output
    for name in ("backbone.pth", "backbone_ema.pth"):  # = what the FSDP2 run exported at its end
        _assert_trees_equal(toy.ToyAdapter.load(tok, tmp_path / "last" / name).backbone.state_dict(),
                            toy.ToyAdapter.load(tok, run / name).backbone.state_dict(), name)
    r = toy.invoke("export-checkpoint", ckpt.sharded_path(run / "checkpoints", 2), "--out", tmp_path / "s2")
    assert r.exit_code == 0 and "step 2" in r.output, r.output
    step2 = toy.ToyAdapter.load(tok, tmp_path / "s2" / "backbone.pth").backbone.state_dict()
    _assert_trees_equal(step2, ckpt.load_checkpoint(world2 / "ref" / "step_00000002.pt")["model"])
    one_error_line(toy.invoke("export-checkpoint", tmp_path / "nowhere", "--out", tmp_path / "x"),
                   "checkpoint not found")
