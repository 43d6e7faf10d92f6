"""Issue 19 item 9: `sar study --launcher slurm` through submitit, tested offline.

* the submission: fake ``sbatch`` / ``srun`` on PATH record what submitit really generates
  (sbatch scripts and pickled jobs): the start job, one array of runs after it (afterok),
  the report after the array (afterany), requeue and the checkpoint signal;
* preemption: submitit's checkpoint hook of a job stops the sar run with SIGUSR1 (it writes
  its checkpoint, exit 143) and the resubmitted job continues it to the end."""

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import toy_adapter as toy
from sar_core.train import checkpointing as ckpt

pytest.importorskip("submitit")

HERE = Path(__file__).parent

FAKE_SBATCH = """#!{python}
import pathlib, shutil, sys
rec = pathlib.Path({rec!r})
n = len(list(rec.glob("*.sh"))) + 1
shutil.copy(sys.argv[-1], rec / f"{{n}}.sh")
print(f"Submitted batch job {{n}}")
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    bin_dir, rec = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    rec.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH.format(python=sys.executable, rec=str(rec)))
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return rec


def _sbatch_lines(script: Path) -> dict:
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value
    return out


def test_study_submits_start_then_an_array_of_runs_then_the_report(tmp_path, fake_slurm):
    out = tmp_path / "study"
    r = toy.invoke("study", "--preset", "demo", "--set", "seeds=[0,1]", "--out", out, "--launcher", "slurm",
                   "--slurm-partition", "gpu", "--slurm-time", "90", "--slurm-cpus", "6",
                   "--slurm-setup", "source /opt/venv/bin/activate")
    assert r.exit_code == 0, r.output
    scripts = sorted(fake_slurm.glob("*.sh"), key=lambda p: int(p.stem))
    assert [p.stem for p in scripts] == ["1", "2", "3"]  # start, the array, the report: three sbatch calls
    start, runs, report = (_sbatch_lines(p) for p in scripts)
    for s in (start, runs, report):
        assert s["partition"] == "gpu" and s["time"] == "90" and "requeue" in s
        assert s["signal"].startswith("USR2@")  # submitit's checkpoint signal before the time limit
    assert "dependency" not in start and start["gpus-per-node"] == "1" and start["cpus-per-task"] == "6"
    assert runs["array"].startswith("0-3%") and runs["dependency"] == "afterok:1"  # 2 arms x 2 seeds
    assert report["dependency"] == "afterany:2" and "gpus-per-node" not in report
    assert "source /opt/venv/bin/activate" in scripts[0].read_text()
    assert "submitit.core._submit" in scripts[1].read_text()

    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    assert (out / "study.yaml").is_file()
    assert jobs["start"]["command"][-6:] == ["--out", str(out.resolve()), "--arm", "start", "--threads", "6"]
    assert sorted(j["name"] for j in jobs["runs"]) == ["var/sar/seed0", "var/sar/seed1", "var/tf/seed0",
                                                      "var/tf/seed1"]
    assert jobs["report"]["command"][-3:] == ["report", str(out.resolve())][-3:] or \
        jobs["report"]["command"][-2:] == ["report", str(out.resolve())]
    # what each array task will run: the pickled job submitit hands to the cluster
    for j in jobs["runs"]:
        pkl = out / "slurm" / j["job_id"] / f"{j['job_id']}_submitted.pkl"
        with open(pkl, "rb") as fh:
            delayed = pickle.load(fh)
        cmd = delayed.function.command
        assert cmd == j["command"] and "--arm" in cmd and "--seed" in cmd and hasattr(delayed.function, "checkpoint")
        fam, arm, seed = j["name"].split("/")
        assert cmd[cmd.index("--arm") + 1] == arm and cmd[cmd.index("--seed") + 1] == seed[len("seed"):]


def test_slurm_launcher_needs_a_partition_and_no_local_job_flags(tmp_path, fake_slurm):
    for extra, needle in ((["--launcher", "slurm"], "--slurm-partition"),
                          (["--launcher", "slurm", "--slurm-partition", "p", "--jobs", "2"], "--jobs"),
                          (["--launcher", "pbs"], "local or slurm")):
        r = toy.invoke("study", "--preset", "demo", "--out", tmp_path / "s", *extra)
        assert r.exit_code == 2 and needle in r.stderr, r.output
    assert list(fake_slurm.glob("*.sh")) == []


def _steps(out: Path) -> list[int]:
    p = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in p.read_text().splitlines()] if p.is_file() else []


def test_preemption_checkpoints_through_sigusr1_and_the_requeued_job_continues(tmp_path, monkeypatch):
    import submitit

    from sar_core.study.slurm import StudyJob

    out = tmp_path / "run"
    cmd = [sys.executable, str(HERE / "signal_worker.py"), "cli", "train", "-f", "toy", "--random-tokenizer",
           "--data", "toy-slow", "--batch-size", "4", "--workers", "0", "--loggers", "jsonl", "--steps", "12",
           "--save-every", "0", "--device", "cpu", "--resume", "--out", str(out)]
    monkeypatch.setenv("SAR_TEST_SLOW_S", "0.05")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(HERE.parent)
    job = StudyJob(cmd, "toy/tf/seed0")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(code=job()))
    runner.start()
    deadline = time.monotonic() + 120
    while len(_steps(out)) < 2:
        assert time.monotonic() < deadline and runner.is_alive(), "the run did not start"
        time.sleep(0.05)
    delayed = job.checkpoint()  # what submitit calls on USR2 before the time limit / preemption
    runner.join(60)
    assert result.get("code") == 143  # the sar run took the SIGUSR1-then-checkpoint path
    stopped = _steps(out)[-1]
    assert 2 <= stopped < 12 and [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [stopped]
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function.command == cmd and delayed.function is not job
    monkeypatch.setenv("SAR_TEST_SLOW_S", "0")
    assert delayed.result() == 0  # the requeued job: the same command resumes to the end
    assert _steps(out) == list(range(1, 13))
    # the child ignores submitit's own signal (SLURM may send it to every process of the step)
    probe = StudyJob([sys.executable, "-c", "import os, signal, time; os.kill(os.getpid(), signal.SIGUSR2); "
                      "time.sleep(0.2)"], "probe")
    assert probe() == 0
