"""Start-up time of the CLI: ``sar --help``, ``sar train --help`` and one TAB completion.

    .venv/bin/python benchmarks/cli_startup.py [--runs 20] [--warmup 3]

Each command runs ``--runs`` times in a fresh process after ``--warmup`` runs (hyperfine
style): mean +- sd, median and min of the wall time and of the child's CPU time
(user + sys; on a shared machine the CPU time is the robust one). The goal is
``sar --help`` under 0.5 s. Byte-compiled modules matter: ``make`` compiles what these
commands import; with PYTHONDONTWRITEBYTECODE set and no ``__pycache__`` each run re-parses.
Also ``python -X importtime -c 'import sar_cli.main'`` lists what the start-up imports.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SAR = shutil.which("sar", path=str(Path(sys.executable).parent)) or "sar"


def cases(sar: str = SAR) -> dict[str, tuple[list[str], dict]]:
    """label -> (command, extra environment)."""
    return {
        "python -c pass (floor)": ([sys.executable, "-c", "pass"], {}),
        "sar --help": ([sar, "--help"], {}),
        "sar train --help": ([sar, "train", "--help"], {}),
        "TAB: sar train -f <TAB>": ([sar], {"_SAR_COMPLETE": "complete_bash", "COMP_WORDS": "sar train -f ",
                                            "COMP_CWORD": "3"}),
    }


CASES = cases()


def run_once(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall s, child CPU s) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env},
                   check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(cmd: list[str], env: dict, runs: int, warmup: int) -> dict:
    for _ in range(warmup):
        run_once(cmd, env)
    walls, cpus = zip(*(run_once(cmd, env) for _ in range(runs)))
    stats = {}
    for name, xs in (("wall", walls), ("cpu", cpus)):
        stats[name] = {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                       "median": statistics.median(xs), "min": min(xs)}
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sar", default=SAR, help="the sar executable to time (e.g. another checkout's)")
    args = ap.parse_args(argv)
    print(f"{'command':28s} {'wall mean +- sd':>18s} {'median':>8s} {'min':>7s}   "
          f"{'CPU mean +- sd':>17s} {'median':>8s} {'min':>7s}   (s, {args.runs} runs, load "
          f"{os.getloadavg()[0]:.1f})")
    for label, (cmd, env) in cases(args.sar).items():
        s = measure(cmd, env, args.runs, args.warmup)
        w, c = s["wall"], s["cpu"]
        print(f"{label:28s} {w['mean']:9.3f} +- {w['sd']:5.3f} {w['median']:8.3f} {w['min']:7.3f}   "
              f"{c['mean']:8.3f} +- {c['sd']:5.3f} {c['median']:8.3f} {c['min']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
