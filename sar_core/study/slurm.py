"""Submitting a study to SLURM through submitit (``sar study FILE --launcher slurm``).

Three submissions, each job the same command a person would run by hand:

1. the start job, ``sar study DIR/study.yaml --out DIR --arm start`` (code caches, the
   start model under every noise seed);
2. one array job, one task per family x arm x seed, ``... --family F --arm A --seed S``,
   each depending on the start job (``afterok``);
3. the report job, ``sar study report DIR``, after every array task ended (``afterany``:
   a failed run is listed in the report as not yet evaluated).

Preemption and time limits: submitit asks SLURM for its signal (``USR2``) ``signal_delay_s``
seconds before the end, and calls :meth:`StudyJob.checkpoint`, which forwards SIGUSR1 to the
sar process (SIGTERM to torchrun, which relays it to its ranks): the run finishes the step
under way, writes its checkpoint and exits 143, then submitit requeues the job and the same
command continues from that checkpoint (study run folders resume on their own). The sar
process ignores ``USR2`` itself, so a signal SLURM sends to every process of the step reaches
it only as the forwarded SIGUSR1. ``#SBATCH --requeue`` lets SLURM's own preemption requeue
it too (a SIGTERM then takes the same checkpoint path).

submitit is an optional extra (``pip install 'sar[slurm]'``); it is imported only here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sar_core.study.config import START
from sar_core.study.plan import RunSpec

#: exit status of a sar run stopped by SIGTERM / SIGUSR1 after its checkpoint (signals.EXIT_SIGNALLED)
EXIT_SIGNALLED = 143


@dataclass
class SlurmOptions:
    """What the submissions ask SLURM for (``sar study --slurm-*`` flags)."""

    partition: str
    time_min: int = 240                  # per job; a run past it is checkpointed and requeued
    gpus_per_run: int = 1                # >1: the run is launched with torchrun on one node
    cpus_per_run: int = 8
    mem_gb: Optional[float] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    array_parallelism: int = 64          # array tasks running at once
    signal_delay_s: int = 120            # the checkpoint signal comes this long before the end
    setup: list[str] = field(default_factory=list)  # shell lines before each job (module load, venv)
    max_requeues: int = 10               # timeouts / preemptions a job may be requeued after


class StudyJob:
    """One job's command, run as a child process; submitit's checkpoint hook stops it
    through sar's own stop signal and resubmits the same command."""

    def __init__(self, command: list[str], name: str, torchrun: bool = False):
        self.command, self.name, self.torchrun = [str(c) for c in command], name, bool(torchrun)
        self._pid: Optional[int] = None
        self._code: Optional[int] = None
        self._stopping = False

    def __getstate__(self) -> dict:  # what is pickled for the cluster: the command only
        return {"command": self.command, "name": self.name, "torchrun": self.torchrun}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["command"], state["name"], state.get("torchrun", False))

    def __repr__(self) -> str:
        return f"StudyJob({self.name}: {' '.join(self.command)})"

    @staticmethod
    def _child_setup() -> None:  # submitit's preemption signal is for the parent only
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)

    def _wait(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Sleep until the child's exit status is known (a waiter thread records it): no
        lock is held here, so submitit's signal handler may wait too, in the same thread."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._code is None and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.1)
        return self._code

    def __call__(self) -> int:
        self._stopping, self._code = False, None
        proc = subprocess.Popen(self.command, preexec_fn=self._child_setup,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._pid = proc.pid

        def reap() -> None:
            self._code = proc.wait()

        threading.Thread(target=reap, name=f"sar-job-{self.name}", daemon=True).start()
        code = self._wait()
        if code == 0 or (self._stopping and code == EXIT_SIGNALLED):
            return code
        if code == EXIT_SIGNALLED:
            raise RuntimeError(f"{self.name}: stopped by a signal after writing its checkpoint (exit 143); "
                               "requeue or resubmit the job to continue from it")
        raise RuntimeError(f"{self.name}: `{' '.join(self.command)}` exited with status {code}")

    def stop(self, timeout_s: Optional[float] = None) -> Optional[int]:
        """Ask the running command to checkpoint and exit (SIGUSR1; SIGTERM to torchrun);
        wait for it. Returns its exit status (None: nothing was started)."""
        if self._pid is None:
            return None
        if self._code is None:
            self._stopping = True
            os.kill(self._pid, signal.SIGTERM if self.torchrun else signal.SIGUSR1)
            if self._wait(timeout_s) is None:
                os.kill(self._pid, signal.SIGKILL)  # out of time: the newest complete checkpoint is kept
                self._wait()
        return self._code

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on preemption / time limit: stop the run (it writes its
        checkpoint), then resubmit this same command, which resumes from it."""
        import submitit

        self.stop(timeout_s=float(os.environ.get("SAR_SLURM_STOP_TIMEOUT_S", "100")))
        return submitit.helpers.DelayedSubmission(StudyJob(self.command, self.name, self.torchrun))


def _sar(*args: str) -> list[str]:
    return [sys.executable, "-m", "sar_cli.main", *args]


def job_commands(out: Path, runs: list[RunSpec], options: SlurmOptions,
                 family: Optional[str] = None) -> dict:
    """{"start": StudyJob, "runs": [StudyJob], "report": StudyJob} of a study folder."""
    out = Path(out).resolve()
    study = str(out / "study.yaml")
    threads = ["--threads", str(options.cpus_per_run)]
    fam = ["--family", family] if family else []
    start = StudyJob(_sar("study", study, "--out", str(out), "--arm", START, *fam, *threads), f"{START}")
    jobs = []
    for r in runs:
        args = ["study", study, "--out", str(out), "--family", r.family, "--arm", r.arm, "--seed", str(r.seed),
                *threads]
        if options.gpus_per_run > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={options.gpus_per_run}", "-m", "sar_cli.main", *args]
        else:
            cmd = _sar(*args)
        jobs.append(StudyJob(cmd, f"{r.family}/{r.arm}/seed{r.seed}", torchrun=options.gpus_per_run > 1))
    report = StudyJob(_sar("study", "report", str(out)), "report")
    return {"start": start, "runs": jobs, "report": report}


def _executor(folder: Path, options: SlurmOptions, name: str, gpus: int, dependency: Optional[str]):
    import submitit

    ex = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=options.max_requeues)
    extra = {"requeue": True}
    if dependency:
        extra["dependency"] = dependency
    if options.account:
        extra["account"] = options.account
    params = dict(partition=options.partition, time=options.time_min, cpus_per_task=options.cpus_per_run,
                  ntasks_per_node=1, nodes=1, job_name=name, signal_delay_s=options.signal_delay_s,
                  array_parallelism=options.array_parallelism, additional_parameters=extra)
    if gpus:
        params["gpus_per_node"] = gpus
    if options.mem_gb:
        params["mem"] = f"{int(options.mem_gb)}GB"
    if options.qos:
        params["qos"] = options.qos
    if options.setup:
        params["setup"] = list(options.setup)
    ex.update_parameters(**params)
    return ex


def submit_study(out: Path, runs: list[RunSpec], options: SlurmOptions, study_name: str,
                 family: Optional[str] = None, log: Callable[[str], None] = print) -> dict:
    """Submit the start job, the array of runs after it and the report after them;
    returns (and writes to ``DIR/slurm/jobs.json``) the job ids and commands."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ImportError("--launcher slurm needs submitit: pip install 'sar[slurm]'") from None
    out = Path(out).resolve()
    folder = out / "slurm" / "%j"
    cmds = job_commands(out, runs, options, family)
    gpus = options.gpus_per_run
    start = _executor(folder, options, f"sar-{study_name}-start", gpus, None).submit(cmds["start"])
    log(f"submitted the start job {start.job_id}: {' '.join(cmds['start'].command)}")
    array_ids: list[str] = []
    if cmds["runs"]:
        ex = _executor(folder, options, f"sar-{study_name}-runs", gpus, f"afterok:{start.job_id}")
        with ex.batch():
            jobs = [ex.submit(j) for j in cmds["runs"]]
        array_ids = [j.job_id for j in jobs]
        log(f"submitted {len(jobs)} runs as the array job {array_ids[0].split('_')[0]} (after {start.job_id})")
    after = array_ids[0].split("_")[0] if array_ids else start.job_id
    report = _executor(folder, options, f"sar-{study_name}-report", 0, f"afterany:{after}").submit(cmds["report"])
    log(f"submitted the report job {report.job_id} (after {after}); it writes {out / 'report.md'}")
    summary = {"start": {"job_id": start.job_id, "command": cmds["start"].command},
               "runs": [{"job_id": i, "name": j.name, "command": j.command} for i, j in zip(array_ids, cmds["runs"])],
               "report": {"job_id": report.job_id, "command": cmds["report"].command},
               "logs": str(out / "slurm")}
    from sar_core.checkpoint_io import atomic_write_text

    atomic_write_text(json.dumps(summary, indent=2), out / "slurm" / "jobs.json")
    return summary
