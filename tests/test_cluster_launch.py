"""The launch forms of docs/cluster.md at toy size on the CPU (gloo): ``torchrun
--standalone`` on one node, and the multi-node form (``--rdzv-backend c10d`` with one
endpoint and one id) as two "nodes" of one rank each on localhost. Each trains a toy model
one step to the end as one run of world size 2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import toy_adapter as toy
from cli_asserts import free_port as _free_port

HERE = Path(__file__).parent
DOC = HERE.parent / "docs" / "cluster.md"




def _train(out: Path) -> list[str]:
    return [str(HERE / "toy_adapter.py"), "train", "-f", "toy", "--random-tokenizer", "--data", "toy-images",
            "--steps", "1", "--batch-size", "4", "--workers", "0", "--loggers", "jsonl", "--out", str(out), "--resume"]


def _check(out: Path, procs: list[subprocess.Popen]) -> None:
    logs = [p.communicate(timeout=300) for p in procs]
    for p, (so, se) in zip(procs, logs):
        assert p.returncode == 0, so[-2000:] + se[-2000:]
    from sar_core.train import checkpointing as ckpt

    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert state["data"]["world_size"] == 2 and len(state["rng"]) == 2
    assert [r["step"] for r in toy.read_metrics(out)] == [1] and (out / "backbone.pth").is_file()


@pytest.mark.parametrize("form", ["standalone", "c10d-two-nodes"])
def test_the_documented_launch_forms_train_one_run(tmp_path, form):
    doc = DOC.read_text()
    run = [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    if form == "standalone":
        assert "torchrun --standalone --nnodes 1 --nproc-per-node 8" in doc
        cmds = [run + ["--standalone", "--nnodes", "1", "--nproc-per-node", "2"] + _train(out)]
    else:
        flags = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "--rdzv-id", "--max-restarts 0", "--shutdown-timeout"]
        assert all(f in doc for f in flags)
        launcher = run + ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                          f"127.0.0.1:{_free_port()}", "--rdzv-id", f"test-{os.getpid()}", "--max-restarts", "0",
                          "--shutdown-timeout", "60"]
        cmds = [launcher + _train(out), launcher + _train(out)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=HERE.parent) for c in cmds]
    try:
        _check(out, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
