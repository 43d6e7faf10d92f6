"""Per-scale difference maps: where on the token grid the model's own inputs change its predictions.

For every transition k -> k+1 (as in :mod:`sar_core.diagnostics`), the one-step
student-forced pass builds the input of scale k+1 from the model's argmax prediction at
scale k; the map of scale k+1 is, per token position (h, w), the fraction of samples
(and of bits, for bitwise codes) whose argmax prediction on those inputs differs from its
argmax prediction on ground-truth inputs. 0 everywhere: the model ignores its own
mistakes; bright cells: where exposure bias changes what it predicts. Only the adapter
contract is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch
from einops import rearrange
from torch.utils.data import Dataset

from sar_core.diagnostics import _batches, _split_batch
from sar_core.schedule import Schedule
from sar_core.tokens import group_logits, token_argmax


def _disagree_Bn(logits_a: torch.Tensor, logits_b: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """(B, n): fraction of a token's groups (1, or d bits) whose argmax differs."""
    a = group_logits(logits_a, bits).argmax(-1)
    b = group_logits(logits_b, bits).argmax(-1)
    return (a != b).float().mean(-1)


@torch.no_grad()
def difference_maps(adapter, data: Dataset | Iterable, schedule: Schedule | str | None = None,
                    batches: Optional[int] = None, *, batch_size: int = 32) -> dict:
    """{'schedule', 'num_samples', 'maps': [None, (h1, w1) tensor, ...]} (scale 0 has none)."""
    schedule = Schedule.parse(schedule) if schedule is not None else adapter.default_schedule
    if len(schedule) < 2:
        raise ValueError("difference maps need a schedule of at least two scales")
    bits, K = adapter.bits_per_token, len(schedule)
    sums = [torch.zeros(h * w, dtype=torch.float64) for h, w in schedule]
    n = 0
    with adapter.inference():
        for i, batch in enumerate(_batches(data, batch_size)):
            if batches is not None and i >= batches:
                break
            codes, cond, size = _split_batch(adapter, batch, schedule)
            tf_BLV = adapter.forward(cond, adapter.teacher_inputs(codes, schedule), schedule).float()
            preds = [token_argmax(tf_BLV[:, schedule.slice(k)], bits) for k in range(K)]
            for k in range(K - 1):
                sf_BLV = adapter.forward(cond, adapter.stagger_inputs(codes, preds, schedule, [k]), schedule).float()
                sl = schedule.slice(k + 1)
                sums[k + 1] += _disagree_Bn(sf_BLV[:, sl], tf_BLV[:, sl], bits).double().sum(0).cpu()
            n += size
    if n == 0:
        raise ValueError("no batches to evaluate")
    maps = [None] + [rearrange(sums[k] / n, "(h w) -> h w", h=h, w=w).float()
                     for k, (h, w) in enumerate(schedule) if k > 0]
    return {"family": adapter.name, "schedule": schedule.to_list(), "num_samples": n, "maps": maps}


def save_difference_maps(report: dict, out_dir: str | Path, title: str = "") -> list[Path]:
    """One PNG per scale (``scale_KK.png``) plus ``all_scales.png`` (a row of panels on one
    colour scale); returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = [(k, m) for k, m in enumerate(report["maps"]) if m is not None]
    vmax = max(float(m.max()) for _, m in maps) or 1.0
    paths = []
    for k, m in maps:
        fig = Figure(figsize=(3, 3))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        im = ax.imshow(m.numpy(), vmin=0, vmax=vmax, cmap="magma")
        ax.set(title=f"scale {k} ({m.shape[0]}x{m.shape[1]})", xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"scale_{k:02d}.png", dpi=100)
        paths.append(out / f"scale_{k:02d}.png")
    fig = Figure(figsize=(2.2 * len(maps) + 1, 2.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (k, m) in zip(axes, maps):
        im = ax.imshow(m.numpy(), vmin=0, vmax=vmax, cmap="magma")
        ax.set(title=f"scale {k}: {float(m.mean()):.2f}", xticks=[], yticks=[])
    fig.colorbar(im, ax=list(axes), fraction=0.02)
    fig.suptitle(title or f"{report['family']}: P(prediction changes on own input), {report['num_samples']} samples",
                 fontsize=9)
    fig.savefig(out / "all_scales.png", dpi=100)
    paths.append(out / "all_scales.png")
    return paths
