"""Statistics of a study: paired differences over seeds with t-intervals, metric noise.

Nothing here knows a model: inputs are per-seed numbers. The 95% interval of a paired
mean difference over n seeds is ``mean ± t(0.975, n-1) * sd / sqrt(n)`` (Student t; the
quantiles below are the standard table values, the normal 1.96 beyond 30 degrees of
freedom). With one value, or values that do not spread (sd 0, e.g. a quantised metric
that came out the same under every seed), the interval is *undefined*: its ends are None,
``excludes_zero`` is None and ``undefined`` says why, so a zero-width interval is never
read as significant. :func:`verdict` turns an interval into one word.
"""

from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Optional, Sequence

# two-sided 95% Student-t critical values t(0.975, df), df = 1..30
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


ONE_VALUE, ZERO_SPREAD = "one value", "zero spread"  # why an interval is undefined


def interval(values: Sequence[float]) -> dict:
    """Mean, sd, standard error and the 95% t-interval of ``values``. Undefined (ends and
    ``excludes_zero`` None, ``undefined`` = :data:`ONE_VALUE` / :data:`ZERO_SPREAD`) with
    fewer than two values or when they do not spread."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    m = mean(xs)
    if n < 2:
        return {"n": n, "mean": m, "sd": None, "se": None, "low": None, "high": None, "excludes_zero": None,
                "undefined": ONE_VALUE}
    sd = stdev(xs)
    if sd <= 1e-12 * max(1.0, abs(m)):
        return {"n": n, "mean": m, "sd": 0.0, "se": 0.0, "low": None, "high": None, "excludes_zero": None,
                "undefined": ZERO_SPREAD}
    se = sd / math.sqrt(n)
    half = t_critical(n - 1) * se
    return {"n": n, "mean": m, "sd": sd, "se": se, "low": m - half, "high": m + half,
            "excludes_zero": bool(m - half > 0 or m + half < 0), "undefined": None}


BETTER, WORSE, INCONCLUSIVE, UNDEFINED = "better", "worse", "inconclusive", "undefined"


def verdict(d: Optional[dict], higher_is_better: bool) -> Optional[str]:
    """One word for a difference's interval: ``better`` / ``worse`` only when the 95%
    interval excludes 0, ``inconclusive`` when it holds 0, ``undefined`` when there is no
    interval (one value, zero spread); None without a difference."""
    if d is None:
        return None
    if d.get("low") is None:
        return UNDEFINED
    if not d["excludes_zero"]:
        return INCONCLUSIVE
    return BETTER if (d["mean"] > 0) == higher_is_better else WORSE


def paired_difference(arm: dict, control: dict) -> Optional[dict]:
    """{seed: value} of an arm and the control -> interval of arm - control over the
    seeds both have, plus the seeds used; None without a common seed."""
    seeds = sorted(set(arm) & set(control), key=str)
    if not seeds:
        return None
    out = interval([arm[s] - control[s] for s in seeds])
    out["seeds"] = list(seeds)
    return out


def noise(values: Sequence[float]) -> dict:
    """Measurement noise: sd of the same model's metric over sampling seeds, also relative
    to its mean, and the sd of a difference of two independent evaluations (sqrt 2 sd)."""
    xs = [float(v) for v in values]
    if len(xs) < 2:
        return {"n": len(xs), "mean": xs[0] if xs else None, "sd": None, "relative": None, "diff_sd": None}
    m, sd = mean(xs), stdev(xs)
    return {"n": len(xs), "mean": m, "sd": sd, "relative": sd / abs(m) if m else None,
            "diff_sd": math.sqrt(2) * sd}


def is_flat(change: Optional[dict], noise_sd: Optional[float]) -> Optional[bool]:
    """The control arm is flat on a metric when its mean change from the start model is
    within two noise standard deviations (deterministic metrics: within 1e-9)."""
    if change is None or noise_sd is None:
        return None
    return abs(change["mean"]) <= max(2 * noise_sd, 1e-9)
