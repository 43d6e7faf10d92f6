"""SIGTERM / SIGUSR1 stop a run with a checkpoint that resumes bit for bit (one process and
2-process torchrun); a frozen peer rank stops the others after dist.timeout_s."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from sar_core.train import checkpointing as ckpt
from sar_core.train.signals import EXIT_SIGNALLED

import toy_adapter as toy
from signal_worker import ActAt, SlowData
from test_train_resume import _args, _assert_same_run, _final
from cli_asserts import free_port as _free_port

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}




def test_sigusr1_mid_run_checkpoints_and_resumes_bit_identical(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    ref_dir = tmp_path / "ref"
    assert toy.invoke(*_args(ref_dir, "--workers", "0")).exit_code == 0
    out = tmp_path / "run"
    toy.use_registry(monkeypatch, ActAt(1, "kill", "SIGUSR1"))  # the signal lands after step 1
    r = toy.invoke(*_args(out, "--workers", "0"))
    assert r.exit_code == EXIT_SIGNALLED == 143, r.output
    assert "received SIGUSR1" in r.stdout
    assert "stopped by SIGUSR1 after step 2" in r.stderr and "--resume" in r.stderr  # flag read in step 2
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    _assert_same_run(_final(ref_dir), _final(out))


def _wait_for_steps(out: Path, n: int, proc, limit: float = 120.0) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        assert proc.poll() is None, proc.communicate()
        path = out / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach step %d" % n)


def test_sigterm_to_sar_train_writes_a_checkpoint_that_resumes_bit_identical(tmp_path, monkeypatch):
    common = ["train", "-f", "toy", "--random-tokenizer", "--data", "toy-slow", "--batch-size", "4", "--workers", "0",
              "--loggers", "jsonl", "--steps", "14", "--save-every", "0", "--lr", "3e-3", "--gamma", "0.5",
              "--rollout-sampling", "sample", "--rollout-top-k", "8", "--ssr-scales", "random"]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(HERE / "signal_worker.py"), "cli", *common, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent,
                            env={**ENV, "SAR_TEST_SLOW_S": "0.05"})
    try:
        _wait_for_steps(out, 3, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "received SIGTERM" in stdout and "Traceback" not in stderr
    steps = [m["step"] for m in toy.read_metrics(out)]
    stopped = steps[-1]
    assert 3 <= stopped < 14 and steps == list(range(1, stopped + 1))
    assert f"stopped by SIGTERM after step {stopped}" in stderr
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [stopped]

    reg = toy.use_registry(monkeypatch, SlowData())
    assert "toy-slow" in reg.names("dataset")
    r = toy.invoke("train", "--out", out, "--resume")  # no sleep in this process
    assert r.exit_code == 0, r.output
    ref = tmp_path / "ref"
    r = toy.invoke(*common, "--out", ref)
    assert r.exit_code == 0, r.output
    a, b = toy.read_metrics(ref), toy.read_metrics(out)
    keys = ("loss", "loss_tf", "loss_csf", "grad_norm", "lr")
    assert [[m[k] for k in keys] for m in a] == [[m[k] for k in keys] for m in b]  # bit for bit
    sa, sb = (ckpt.load_checkpoint(ckpt.latest_checkpoint(d / "checkpoints")) for d in (ref, out))
    assert sa["step"] == sb["step"] == 14
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def _torchrun(*args, timeout=240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or ENV, cwd=HERE.parent)


def test_torchrun_sigterm_on_one_rank_stops_both_at_the_same_step_and_resumes_exactly(tmp_path):
    p = _torchrun(HERE / "signal_worker.py", "dist-resume", tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1))
    # rank 0 alone got SIGTERM after step 2; the flag rides on step 3's all-reduce
    assert r0["stopped"]["status"] == r1["stopped"]["status"] == "signalled"
    assert r0["stopped"]["step"] == r1["stopped"]["step"] == 3
    assert "SIGTERM" in r0["stopped"]["message"] and "another rank" in r1["stopped"]["message"]
    assert r0["resumed"] == r1["resumed"] == {"status": "finished", "step": 4, "message": ""}
    ref, run = tmp_path / "ref", tmp_path / "run"
    keys = ("step", "loss", "loss_tf", "loss_csf", "grad_norm", "lr")
    assert [[m[k] for k in keys] for m in toy.read_metrics(ref)] == [[m[k] for k in keys] for m in toy.read_metrics(run)]
    assert len(toy.read_metrics(run)) == 4
    sa, sb = (ckpt.load_checkpoint(ckpt.latest_checkpoint(d / "checkpoints")) for d in (ref, run))
    assert sa["step"] == sb["step"] == 4 and len(sb["rng"]) == 2
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(ea[i]["exp_avg"], eb[i]["exp_avg"]) for i in ea)


def test_a_frozen_peer_rank_stops_the_other_after_dist_timeout(tmp_path):
    out = tmp_path / "run"
    t0 = time.time()
    p = _torchrun(HERE / "signal_worker.py", "cli", "train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--steps", "4",
                  "--batch-size", "4", "--workers", "0", "--loggers", "jsonl", "--out", out,
                  "--set", "dist.timeout_s=3", timeout=120, env={**ENV, "SAR_TEST_ACT": "2:sleep:6"})
    elapsed = time.time() - t0
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert "rank 1: the other ranks did not answer within dist.timeout_s = 3 s" in text, text[-4000:]
    assert "--set dist.timeout_s=SECONDS" in text
    assert elapsed < 100
    assert [m["step"] for m in toy.read_metrics(out)] == [1, 2]
