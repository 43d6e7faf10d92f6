"""Timing that can be trusted on a shared machine.

* Variants run interleaved, one round = every variant once (order rotated per round), so
  slow drifts of the machine hit all variants alike; each variant's time is divided by
  the baseline's time *of the same round*.
* Each measurement records wall time, this process's CPU time and the CPU time every
  other process used meanwhile (``/proc/stat`` busy jiffies minus ours). A measurement is
  *contaminated* when this process got less than ``min_cpu_share`` of its wall time on
  CPU (it waited for a core) or foreign processes kept more than ``max_foreign`` cores
  busy on average; a round with any contaminated measurement is discarded and repeated,
  up to a time budget.
* The summary is the median of the per-round ratios over clean rounds with a bootstrap
  95% interval (resampling rounds), for wall time and for this process's CPU time. With
  one torch thread the CPU time is the work the step did, nearly blind to waiting for a
  core, so its ratios stay usable when no round is clean (then the least-loaded rounds
  are used and the result is flagged).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_jiffies() -> Optional[int]:
    """Busy jiffies of all CPUs (user+nice+system+irq+softirq+steal), None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


@dataclass
class Sample:
    wall: float
    cpu: float            # this process's CPU seconds
    foreign: float        # average cores kept busy by other processes (nan off Linux)
    threads: int

    def clean(self, min_cpu_share: float, max_foreign: float) -> bool:
        if self.cpu < min_cpu_share * self.wall:  # waited for a core (>= 1 thread busy)
            return False
        return not (self.foreign == self.foreign and self.foreign > max_foreign)


def measure(fn: Callable[[], None], threads: int) -> Sample:
    b0, c0, w0 = _busy_jiffies(), time.process_time(), time.perf_counter()
    fn()
    w1, c1, b1 = time.perf_counter(), time.process_time(), _busy_jiffies()
    wall, cpu = w1 - w0, c1 - c0
    foreign = float("nan")
    if b0 is not None and b1 is not None and wall > 0:
        foreign = max(0.0, (b1 - b0) / CLK - cpu) / wall
    return Sample(wall, cpu, foreign, threads)


@dataclass
class Summary:
    median: float
    lo: float
    hi: float
    n: int


def bootstrap(values: list[float], reps: int = 2000, seed: int = 0, alpha: float = 0.05) -> Summary:
    """Median and a percentile bootstrap interval of the median."""
    if not values:
        return Summary(float("nan"), float("nan"), float("nan"), 0)
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(reps))
    lo, hi = meds[int(alpha / 2 * reps)], meds[min(reps - 1, int((1 - alpha / 2) * reps))]
    return Summary(statistics.median(values), lo, hi, len(values))


@dataclass
class RoundsResult:
    baseline: str
    times: dict[str, list[float]] = field(default_factory=dict)    # wall s, clean rounds only
    ratios: dict[str, list[float]] = field(default_factory=dict)   # variant / baseline per clean round
    cpu_times: dict[str, list[float]] = field(default_factory=dict)
    cpu_ratios: dict[str, list[float]] = field(default_factory=dict)
    rejected: int = 0
    clean: int = 0
    fallback: bool = False  # True when too few clean rounds: least-loaded rounds were used

    def summary(self, name: str) -> Summary:
        return bootstrap(self.ratios[name])

    def time_summary(self, name: str) -> Summary:
        return bootstrap(self.times[name])

    def cpu_summary(self, name: str) -> Summary:
        return bootstrap(self.cpu_ratios[name])

    def cpu_time_summary(self, name: str) -> Summary:
        return bootstrap(self.cpu_times[name])


def run_rounds(variants: dict[str, Callable[[], None]], baseline: str, rounds: int = 7,
               budget_s: float = 120.0, threads: int = 1, min_cpu_share: float = 0.9,
               max_foreign: float = 0.5, log: Callable[[str], None] = lambda s: None) -> RoundsResult:
    """Interleaved rounds until ``rounds`` clean ones or ``budget_s`` seconds have passed.

    With fewer clean rounds than asked at the deadline, the least contaminated rounds fill
    up the count (``fallback=True``), so a busy machine still gives a figure, flagged."""
    names = list(variants)
    res = RoundsResult(baseline, *({n: [] for n in names} for _ in range(4)))
    dirty: list[tuple[float, dict[str, Sample]]] = []
    t_end, r = time.perf_counter() + budget_s, 0
    while res.clean < rounds and (time.perf_counter() < t_end or res.clean + len(dirty) == 0):
        order = names[r % len(names):] + names[:r % len(names)]
        r += 1
        samples = {n: measure(variants[n], threads) for n in order}
        ok = all(s.clean(min_cpu_share, max_foreign) for s in samples.values())
        times = {n: s.wall for n, s in samples.items()}
        load = max((s.foreign if s.foreign == s.foreign else 0.0) + max(0.0, 1 - s.cpu / s.wall)
                   for s in samples.values())
        log(f"round {r}: {'clean' if ok else 'busy '} load {load:.2f} "
            + " ".join(f"{n} {1e3 * t:.0f}ms" for n, t in times.items()))
        if ok:
            res.clean += 1
            _add(res, samples)
        else:
            res.rejected += 1
            dirty.append((load, samples))
    if res.clean < rounds and dirty:
        res.fallback = True
        for _, samples in sorted(dirty, key=lambda d: d[0])[:rounds - res.clean]:
            _add(res, samples)
    return res


def _add(res: RoundsResult, samples: dict[str, Sample]) -> None:
    base = samples[res.baseline]
    for n, s in samples.items():
        res.times[n].append(s.wall)
        res.ratios[n].append(s.wall / base.wall)
        res.cpu_times[n].append(s.cpu)
        res.cpu_ratios[n].append(s.cpu / max(base.cpu, 1e-9))
