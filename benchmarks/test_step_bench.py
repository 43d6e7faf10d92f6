"""Step benchmark under pytest (not part of the tests): the same harness as ``make bench``.

    .venv/bin/python -m pytest -q -s benchmarks/test_step_bench.py

Each size runs the interleaved rounds of ``benchmarks/step_bench.py`` (busy rounds
detected and repeated, per-round ratios, bootstrap intervals) and prints its table;
``benchmark.extra_info`` carries the ratios for pytest-benchmark's JSON output.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.step_bench import DEFAULT, bench_size, report

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("size", ["tiny", "large"])
def test_step_ratios(benchmark, size, capsys):
    r = bench_size(size, DEFAULT[size], rounds=5, budget=110, threads=torch.get_num_threads(), device=DEVICE,
                   log=lambda m: None)
    res, mem = r["rounds"], r["memory"]
    benchmark.extra_info.update({n: {"x_tf_wall": res.summary(n).median, "x_tf_cpu": res.cpu_summary(n).median,
                                     "process_peak_x_tf": mem[n].process_peak / mem["tf"].process_peak}
                                 for n in res.times})
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    with capsys.disabled():
        print("\n" + report(r, DEVICE, torch.get_num_threads()))
    assert all(m.step_peak > 0 for m in mem.values())
