"""Helpers for the stop-signal / timeout tests, usable in-process and as a script.

* ``ActAt``: a plugin whose ``on_step_end`` (rank 0) sends a signal to its own process
  or sleeps at one step (a frozen rank).
* dataset ``toy-slow``: the toy images, ``SAR_TEST_SLOW_S`` seconds per item (so that an
  external signal lands mid-step).

As a script:
    python signal_worker.py cli train ...        # `sar` with the toy + these plugins;
                                                 # SAR_TEST_ACT="step:kill:SIGTERM" or "step:sleep:8";
                                                 # SAR_TEST_REPORT=DIR: pid, status, step, exit per rank
    torchrun ... signal_worker.py dist-resume TMP   # 2 ranks: reference, SIGTERM on rank 0
                                                    # at step 2, resume; writes TMP/result-<rank>.json
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sar_core.hookspecs import hookimpl  # noqa: E402

import toy_adapter as toy  # noqa: E402


class _SlowItems(toy.ToyImages):
    def __getitem__(self, i):
        time.sleep(float(os.environ.get("SAR_TEST_SLOW_S", "0")))
        return super().__getitem__(i)


def toy_slow(split: str = "train", image_size: int = 8, n: int = 32, **_):
    return _SlowItems(n=n, image_size=image_size)


class ActAt:
    """At ``step``: ``kill`` (send ``arg``, a signal name, to this process) or ``sleep`` (arg s)."""

    def __init__(self, step: int, action: str, arg: str):
        self.__name__ = f"act-{step}-{action}"
        self.step, self.action, self.arg = int(step), action, arg

    @classmethod
    def from_env(cls):
        spec = os.environ.get("SAR_TEST_ACT")
        return cls(*spec.split(":")) if spec else None

    @hookimpl
    def register_datasets(self, register):
        register("toy-slow", toy_slow)

    @hookimpl
    def on_step_end(self, step, metrics):
        if step != self.step:
            return
        if self.action == "kill":
            os.kill(os.getpid(), getattr(signal, self.arg))
        elif self.action == "sleep":
            time.sleep(float(self.arg))


class SlowData:
    __name__ = "toy-slow-data"

    @hookimpl
    def register_datasets(self, register):
        register("toy-slow", toy_slow)


def _report_to(folder: Path):
    """Record this rank's pid now (``pid-<rank>``) and, at exit, its run's status, step and
    exit status (``exit-<rank>.json``)."""
    from sar_core.train.trainer import Trainer

    rank = int(os.environ.get("RANK", "0"))
    (folder / f"pid-{rank}").write_text(str(os.getpid()))
    seen: dict = {}
    run = Trainer.run

    def recorded(self):
        res = run(self)
        seen.update(status=res.status, step=res.step)
        return res

    Trainer.run = recorded

    def write(code):
        (folder / f"exit-{rank}.json").write_text(json.dumps({**seen, "exit": code}))

    return write


def _cli(args: list[str]) -> None:
    from sar_core import plugins
    from sar_cli.main import app

    act = ActAt.from_env()
    plugins._REGISTRY = toy.make_registry(*(act,) if act else (SlowData(),))
    report = os.environ.get("SAR_TEST_REPORT")  # a folder (see _report_to)
    write = _report_to(Path(report)) if report else None
    try:
        app(args)
    except SystemExit as exc:
        if write is not None:
            write(exc.code)
        raise


def _dist_resume(tmp: Path) -> None:
    """Reference run, a run SIGTERM'ed on rank 0 after step 2, its resume; all to 4 steps."""
    import torch
    import torch.distributed as dist

    from sar_core.train.config import build_config
    from sar_core.train.trainer import Trainer

    torch.set_num_threads(1)

    def cfg(name: str, resume: bool = False):
        return build_config({"model": {"family": "toy", "overrides": {"dropout": 0.1}},
                             "data": {"name": "toy-images", "workers": 0},
                             "rollout": {"name": "ssr", "scales": "random", "sampling": "sample", "top_k": 8},
                             "loss": {"gamma": 0.5}, "optim": {"lr": 3e-3},
                             "train": {"batch_size": 4, "steps": 4, "save_every": 0, "loggers": ["jsonl"],
                                       "seed": 5},
                             "out": str(tmp / name), "resume": resume})

    plain, killer = toy.make_registry(), toy.make_registry(ActAt(2, "kill", "SIGTERM"))
    results = {}
    for key, reg, name, resume in (("ref", plain, "ref", False), ("stopped", killer, "run", False),
                                   ("resumed", plain, "run", True)):
        res = Trainer(cfg(name, resume), registry=reg, log=lambda m: None).run()
        results[key] = {"status": res.status, "step": res.step, "message": res.message}
    rank = dist.get_rank()
    (tmp / f"result-{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "cli":
        _cli(sys.argv[2:])
    elif sys.argv[1] == "dist-resume":
        _dist_resume(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
