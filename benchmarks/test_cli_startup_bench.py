"""``sar --help`` start-up time (not part of the tests; goal < 0.5 s on the 2-core machine).

    .venv/bin/pytest benchmarks/test_cli_startup_bench.py --benchmark-only

A fresh process each round, as a user's shell starts it. ``benchmarks/cli_startup.py`` adds
CPU time, ``sar train --help`` and a TAB completion.
"""

from __future__ import annotations

import os
import subprocess

from cli_startup import CASES


def _run(label: str) -> None:
    cmd, env = CASES[label]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env}, check=True)


def test_sar_help_start_up(benchmark):
    benchmark.pedantic(_run, args=("sar --help",), rounds=10, iterations=1, warmup_rounds=2)


def test_completion_start_up(benchmark):
    benchmark.pedantic(_run, args=("TAB: sar train -f <TAB>",), rounds=10, iterations=1, warmup_rounds=2)
