"""``OUT/curves.png``: a run's training curves and its validation metrics against step.

Panels: the training losses (``loss``, ``loss_tf``, ``loss_csf`` of ``metrics.jsonl``; each
smoothed by a debiased exponential moving average, its raw values drawn faint behind it),
the learning rate, the gradient norm, then one panel per validation metric of
``eval.jsonl`` (:mod:`sar_core.train.periodic_eval`): the val TF loss, the mean exposure gap
with the gap of every scale, FID, precision / recall / F-score together, and any other
number an eval recorded. Non-finite values (null in the JSON) are left out. Drawn with the
helpers of :mod:`sar_core.evaluate.pictures` (Agg canvas, atomic write), at the font size
of the study reports.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

#: training series of metrics.jsonl in the loss panel: key -> legend
LOSSES = {"loss": "loss (total)", "loss_tf": "L_TF (teacher-forced)", "loss_csf": "L_CSF (student-forced)"}
#: eval metrics drawn in one panel with the first one (the others are its companions)
GROUPS = (("precision", "recall", "f_score"),)
#: eval metric -> (panel title, per-scale list drawn with it)
TITLES = {"val_loss_tf": ("val TF loss (fixed validation subset)", None),
          "gap_mean": ("mean exposure gap, CE (own input - ground truth)", "gap"),
          "gap_acc_mean": ("mean exposure gap, accuracy", "gap_acc"),
          "fid": ("FID", None), "precision": ("precision / recall", None), "class_acc": ("class accuracy", None)}
FONT = 11  # as the study reports: readable at the PNG's own size


def smoothing_weight(n: int) -> float:
    """EMA weight for ``n`` points: a time constant of about n / 25 points (none below 25)."""
    return 0.0 if n < 25 else min(0.98, 1.0 - 25.0 / n)


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Debiased exponential moving average (the first values are not pulled towards 0)."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm)
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: Sequence[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], float(r[key])) for r in rows if _finite(r.get(key))]
    return [p[0] for p in pts], [p[1] for p in pts]


def eval_panels(evals: Sequence[dict]) -> list[tuple[str, ...]]:
    """The eval panels in order: each a tuple of scalar metric keys drawn together."""
    keys: list[str] = []
    for row in evals:
        for k, v in row.get("metrics", {}).items():
            if _finite(v) and k not in keys:
                keys.append(k)
    grouped = {k for g in GROUPS for k in g[1:]}
    panels = []
    for k in keys:
        if k in grouped:
            continue
        group = next((g for g in GROUPS if g[0] == k), (k,))
        panels.append(tuple(x for x in group if x in keys))
    return panels


def plot_curves(history: Sequence[dict], evals: Sequence[dict], path: str | Path,
                title: Optional[str] = None) -> Path:
    """Write the curves PNG from ``history`` (metrics.jsonl rows) and ``evals`` (eval.jsonl rows)."""
    from sar_core.evaluate.pictures import figure, save_figure

    panels: list = ["losses", "lr", "grad_norm", *eval_panels(evals)]
    ncol = 3
    nrow = -(-len(panels) // ncol)
    height = 3.6 * nrow + (0.4 if title else 0.0)
    fig = figure(5.2 * ncol, height, dpi=100)
    # fixed margins instead of tight_layout: one draw (at savefig) instead of two
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.75 / height, top=1 - (0.75 if title else 0.4) / height,
                        wspace=0.25, hspace=0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        if panel == "losses":
            for key, label in LOSSES.items():
                x, y = _series(history, key)
                if not x or (key == "loss_csf" and not any(y)):
                    continue
                line, = ax.plot(x, smooth(y, smoothing_weight(len(y))), lw=1.6, label=label)
                ax.plot(x, y, lw=0.8, alpha=0.25, color=line.get_color())
            ax.set_title("training losses (smoothed; raw faint)", fontsize=FONT)
        elif panel in ("lr", "grad_norm"):
            x, y = _series(history, panel)
            ax.plot(x, y, lw=1.2, color="tab:green" if panel == "lr" else "tab:purple")
            ax.set_title("learning rate" if panel == "lr" else "gradient norm (before clipping)", fontsize=FONT)
        else:
            _eval_panel(ax, evals, panel)
        ax.set_xlabel("optimizer step", fontsize=FONT - 1)
        ax.tick_params(labelsize=FONT - 2)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=FONT - 3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=FONT + 1, y=1 - 0.2 / height)
    return save_figure(fig, path)


def _eval_panel(ax, evals: Sequence[dict], keys: tuple[str, ...]) -> None:
    rows = [{"step": r["step"], **r.get("metrics", {})} for r in evals]
    title, per_scale = TITLES.get(keys[0], (keys[0], None))
    for k in keys:
        x, y = _series(rows, k)
        ax.plot(x, y, "o-", lw=1.6, ms=4, label=k if len(keys) > 1 or per_scale else None)
    if per_scale:
        n = max((len(r.get(per_scale) or []) for r in rows), default=0)
        for s in range(n):
            pts = [(r["step"], r[per_scale][s]) for r in rows
                   if len(r.get(per_scale) or []) > s and _finite(r[per_scale][s])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.9, alpha=0.6, label=f"scale {s + 1}")
        ax.axhline(0, color="grey", lw=0.5)
    ax.set_title(title, fontsize=FONT)
