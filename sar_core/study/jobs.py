"""Running a study's runs as parallel local jobs (``sar study --jobs N``).

Each run becomes the same command a cluster job would run, ``sar study DIR/study.yaml
--out DIR --arm A --seed S --family F``, in its own process (one torch thread each), at
most N at a time; its output goes to ``DIR/<family>/<arm>/seed<S>.log``. Progress is the
number of optimizer steps the runs' ``metrics.jsonl`` files hold. The numbers equal a
single-process study (each job trains and evaluates exactly as the in-process path).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from sar_core.study.plan import RunSpec
from sar_core.study.config import START


def _done(out: Path, spec: RunSpec) -> Path:
    if spec.arm == START:
        return Path(out) / spec.family / START / "eval.json"
    return spec.folder(out) / "eval.json"


def _log_file(out: Path, spec: RunSpec) -> Path:
    return (Path(out) / spec.family / f"{START}.log") if spec.arm == START else spec.folder(out).with_suffix(".log")


def _steps_done(folder: Path) -> int:
    p = folder / "metrics.jsonl"
    try:
        return sum(1 for line in p.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def _name(spec: RunSpec) -> str:
    return f"{spec.family}/{spec.arm}" + ("" if spec.arm == START else f"/seed{spec.seed}")


def job_command(out: Path, spec: RunSpec, device: str) -> list[str]:
    seed = [] if spec.arm == START else ["--seed", str(spec.seed)]
    return [sys.executable, "-m", "sar_cli.main", "study", str(Path(out) / "study.yaml"), "--out", str(out),
            "--family", spec.family, "--arm", spec.arm, *seed, "--device", device, "--threads", "1"]


def run_jobs(out: Path, specs: list[RunSpec], jobs: int, device: str, log: Callable[[str], None],
             on_progress: Optional[Callable[[int], None]] = None, poll_s: float = 1.0) -> None:
    """Run ``specs`` as subprocesses, ``jobs`` at a time; raise if any fails. A spec with
    arm ``start`` is a family's start-model evaluation (its code cache must exist)."""
    pending = [s for s in specs if not _done(out, s).is_file()]
    running: dict = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed, reported = [], 0
    try:
        while pending or running:
            while pending and len(running) < jobs:
                spec = pending.pop(0)
                logf = _log_file(out, spec)
                logf.parent.mkdir(parents=True, exist_ok=True)
                fh = open(logf, "w")
                log(f"{_name(spec)}: started as a job (log: {logf})")
                running[spec] = (subprocess.Popen(job_command(out, spec, device), stdout=fh,
                                                  stderr=subprocess.STDOUT, env=env), fh)
            time.sleep(poll_s)
            for spec, (proc, fh) in list(running.items()):
                if proc.poll() is None:
                    continue
                fh.close()
                del running[spec]
                if proc.returncode != 0:
                    failed.append(f"{_name(spec)} (exit {proc.returncode}, "
                                  f"see {_log_file(out, spec)})")
                else:
                    log(f"{_name(spec)}: done")
            if on_progress is not None:
                done = sum(_steps_done(s.folder(out)) for s in specs if s.arm != START)
                on_progress(done - reported)
                reported = done
    finally:
        for proc, fh in running.values():  # interrupted: stop our own children
            proc.terminate()
            proc.wait()
            fh.close()
    if failed:
        raise RuntimeError("study jobs failed: " + "; ".join(failed))
