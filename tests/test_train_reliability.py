"""Runs left alone on a cluster (issue 19): stops reach every process, failures never
report success, unreadable resumes touch nothing, the run-folder lock is taken first and
never follows a link."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sar_core.hookspecs import hookimpl
from sar_core.train import checkpointing as ckpt

import toy_adapter as toy
from test_train_signals import ENV, HERE, _free_port, _wait_for_steps

#: a slow toy run with the default two DataLoader workers per rank
SLOW_RUN = ["train", "-f", "toy", "--random-tokenizer", "--data", "toy-slow", "--batch-size", "4", "--workers", "2",
            "--loggers", "jsonl", "--steps", "200", "--save-every", "0"]
SLOW_ENV = {**ENV, "SAR_TEST_SLOW_S": "0.02"}


def _finish(proc, timeout=180) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _stopped_cleanly(out: Path, step: int) -> None:
    """Metrics of steps 1..step, one checkpoint: that of ``step``."""
    assert [m["step"] for m in toy.read_metrics(out)] == list(range(1, step + 1))
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [step]


# ----------------------------------------------------------------------------- 1: stop signals
def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_143(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(HERE / "signal_worker.py"), "cli", *SLOW_RUN, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent,
                            env=SLOW_ENV, start_new_session=True)
    _wait_for_steps(out, 3, proc, limit=200)
    os.killpg(proc.pid, signal.SIGTERM)  # like scancel / kill -TERM -PGID: the workers get it too
    stdout, stderr = _finish(proc)
    assert proc.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "error" not in stderr
    step = toy.read_metrics(out)[-1]["step"]
    assert f"stopped by SIGTERM after step {step}" in stderr
    _stopped_cleanly(out, step)


@pytest.mark.parametrize("who", ["every process", "the launcher"])
def test_sigterm_under_torchrun_with_workers_stops_every_rank_at_one_step(tmp_path, who):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(HERE / "signal_worker.py"), "cli", *SLOW_RUN, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent,
                            env={**SLOW_ENV, "SAR_TEST_REPORT": str(tmp_path)}, start_new_session=True)
    _wait_for_steps(out, 2, proc, limit=200)
    os.kill(proc.pid, signal.SIGTERM)  # torchrun forwards it to each rank's process group
    if who == "every process":  # and each rank (with its workers) gets it directly, like scancel does
        for rank in (0, 1):
            os.killpg(int((tmp_path / f"pid-{rank}").read_text()), signal.SIGTERM)
    stdout, stderr = _finish(proc)
    files = [tmp_path / f"exit-{r}.json" for r in (0, 1)]  # none: the rank died without exiting
    ranks = [json.loads(f.read_text()) if f.exists() else None for f in files]
    step = (ranks[0] or {}).get("step")
    assert ranks == [{"status": "signalled", "step": step, "exit": 143}] * 2, stdout[-2000:] + stderr[-3000:]
    assert f"stopped by SIGTERM after step {step}" in stdout + stderr
    _stopped_cleanly(out, step)
    assert len(ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["rng"]) == 2


# ----------------------------------------------------------------------------- 2: non-finite runs
def _toy_run(out, *extra):
    tok = [] if "--tokenizer" in map(str, extra) else ["--random-tokenizer"]  # a fresh one unless given
    return ["train", "-f", "toy", *tok, "--data", "toy-images", "--batch-size", "4", "--workers", "0",
            "--loggers", "jsonl", "--steps", "3", "--out", out, *extra]


def _error_line(r, code: int) -> str:
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    return lines[0]


def test_nan_in_the_starting_weights_is_refused_before_step_1(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    tok, bb = toy.toy_files(tmp_path)
    payload = torch.load(bb, weights_only=True)
    name = sorted(k for k, v in payload["state_dict"].items() if v.is_floating_point())[-1]
    payload["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(payload, bb)
    out = tmp_path / "run"
    r = toy.invoke(*_toy_run(out, "--tokenizer", tok, "--backbone", bb))
    line = _error_line(r, 2)
    assert "not finite" in line and f"'{name}'" in line and str(bb) in line and "NaN" in line
    assert not (out / "backbone.pth").exists() and not (out / "metrics.jsonl").exists()
    assert ckpt.list_checkpoints(out / "checkpoints") == []


class _SpoilWeightsAt:
    """Writes a NaN into the backbone after one step (weights gone bad during the run)."""

    __name__ = "spoil-weights"

    def __init__(self, step: int):
        self.step, self.trainer = step, None

    @hookimpl
    def on_train_start(self, run):
        self.trainer = run

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == self.step:
            with torch.no_grad():
                next(self.trainer.backbone.parameters()).view(-1)[0] = float("nan")


def test_a_run_ending_with_nonfinite_weights_exports_nothing_and_fails(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, _SpoilWeightsAt(1))
    out = tmp_path / "run"
    r = toy.invoke(*_toy_run(out))  # steps 2 and 3 are skipped: fewer than max_nonfinite (5)
    line = _error_line(r, 1)
    assert "weights are not finite" in line and "NaN" in line and "no backbone written" in line
    assert "2 of 3 steps skipped" in line and "the last 2 in a row" in line
    assert not (out / "backbone.pth").exists()


def test_a_run_whose_every_step_was_skipped_fails_without_export(tmp_path, monkeypatch):
    from test_train_safety import _NaNAt, _NaNPlugin

    toy.use_registry(monkeypatch, _NaNPlugin())
    _NaNAt.calls, _NaNAt.bad = 0, {1, 2, 3}  # the finite start weights are never updated
    out = tmp_path / "run"
    r = toy.invoke(*_toy_run(out, "--csfl", "nan-at"))
    line = _error_line(r, 1)
    assert "all 3 steps were skipped" in line and "no backbone written" in line
    assert not (out / "backbone.pth").exists()


def test_the_final_message_counts_skipped_steps(tmp_path, monkeypatch):
    from test_train_safety import _NaNAt, _NaNPlugin

    toy.use_registry(monkeypatch, _NaNPlugin())
    _NaNAt.calls, _NaNAt.bad = 0, {3}  # the last of 3 steps
    out = tmp_path / "run"
    r = toy.invoke(*_toy_run(out, "--csfl", "nan-at"))
    assert r.exit_code == 0, r.output
    assert "1 of 3 steps skipped (non-finite loss or gradient: no update), the last 1 in a row" in r.stdout
    assert (out / "backbone.pth").exists()


# ----------------------------------------------------------------------------- 3: unreadable resumes
def _run_with_two_checkpoints(out):
    r = toy.invoke(*_toy_run(out, "--steps", "2", "--save-every", "1", "--keep-last", "2"))
    assert r.exit_code == 0, r.output
    found = ckpt.list_checkpoints(out / "checkpoints")
    assert [s for s, _ in found] == [1, 2]
    for _, p in found:  # truncated (a killed copy, a full disk elsewhere, another torch)
        p.write_bytes(p.read_bytes()[:200])
    return [p for _, p in found]


def _snapshot(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != ".lock"}


def test_resume_with_only_unreadable_checkpoints_refuses_and_touches_nothing(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    files = _run_with_two_checkpoints(out)
    before = _snapshot(out)
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "4")
    line = _error_line(r, 2)
    assert all(p.name in line for p in files) and "--restart" in line and "nothing was changed" in line
    assert _snapshot(out) == before  # metrics.jsonl, config.yaml, checkpoints: all as they were


def test_restart_starts_over_explicitly(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    _run_with_two_checkpoints(out)
    both = toy.invoke("train", "--out", out, "--resume", "--restart")
    assert "pass one of them" in _error_line(both, 2)
    r = toy.invoke(*_toy_run(out, "--steps", "3", "--save-every", "0", "--restart"))
    assert r.exit_code == 0, r.output
    assert "--restart: deleted the 2 checkpoint(s)" in r.stdout
    assert [m["step"] for m in toy.read_metrics(out)] == [1, 2, 3]
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [3]
    assert "--restart" in toy.invoke("train", "--help").stdout


# ----------------------------------------------------------------------------- 4: the lock file
@pytest.mark.parametrize("kind", ["symlink", "fifo", "hard link"])
def test_a_lock_file_that_is_not_a_plain_file_is_refused_untouched(tmp_path, monkeypatch, kind):
    toy.use_registry(monkeypatch)
    victim = tmp_path / "teammates_notes.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".lock"
    if kind == "symlink":
        lock.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(lock)
    else:
        os.link(victim, lock)
    r = toy.invoke(*_toy_run(out))
    line = _error_line(r, 2)
    assert str(lock) in line and "remove it" in line
    assert victim.read_text() == "precious"
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def test_sar_train_takes_the_lock_before_building_the_model(tmp_path, monkeypatch):
    from sar_core.train import trainer as trainer_module
    from sar_core.train.runlock import RunLock

    toy.use_registry(monkeypatch)
    built = []
    real = trainer_module.build_adapter
    monkeypatch.setattr(trainer_module, "build_adapter", lambda *a, **k: built.append(1) or real(*a, **k))
    out = tmp_path / "run"
    with RunLock(out):  # a live run on the folder (another open file: flock refuses it)
        r = toy.invoke(*_toy_run(out))
    line = _error_line(r, 2)
    assert "in use by another run" in line and f"pid {os.getpid()}" in line
    assert built == []  # refused before the model (minutes for a 2B one) was loaded
    assert toy.invoke(*_toy_run(out)).exit_code == 0 and built  # the lock is free again
