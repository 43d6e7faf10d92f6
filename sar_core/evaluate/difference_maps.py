"""Per-scale difference maps: where on the token grid the model's own inputs change its predictions.

For every transition k -> k+1 (as in :mod:`sar_core.evaluate.diagnostics`), the one-step
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

from torch.utils.data import Dataset

from sar_core.evaluate.diagnostics import exposure_gap
from sar_core.schedule import Schedule


def difference_maps(adapter, data: Dataset | Iterable, schedule: Schedule | str | None = None,
                    batches: Optional[int] = None, *, batch_size: int = 32) -> dict:
    """{'schedule', 'num_samples', 'maps': [None, (h1, w1) tensor, ...]} (scale 0 has none).
    The passes are those of :func:`~sar_core.evaluate.diagnostics.exposure_gap` (``maps=True`` gives
    both from one set of passes)."""
    schedule = Schedule.parse(schedule) if schedule is not None else adapter.default_schedule
    if len(schedule) < 2:
        raise ValueError("difference maps need a schedule of at least two scales")
    r = exposure_gap(adapter, data, schedule, batches, batch_size=batch_size, maps=True)
    return {"family": adapter.name, "schedule": r["schedule"], "num_samples": r["num_samples"], "maps": r["maps"]}


def save_difference_maps(report: dict, out_dir: str | Path, title: str = "", name: str = "") -> list[Path]:
    """One PNG per scale (``scale_KK.png``) plus ``all_scales.png`` (a row of panels on one
    colour scale, :func:`sar_core.evaluate.pictures.save_maps_side_by_side`); every map at
    least 3 px per token; returns the paths written."""
    from sar_core.evaluate.pictures import DPI, FONT, figure as _figure, map_panel_inches, save_maps_side_by_side

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    maps = [(k, m) for k, m in enumerate(report["maps"]) if m is not None]
    vmax = max(float(m.max()) for _, m in maps) or 1.0
    paths = []
    for k, m in maps:
        pw, ph = map_panel_inches(*m.shape)
        fig = _figure(max(3.0, pw + 1.2), max(3.0, ph + 0.8))
        ax = fig.subplots()
        im = ax.imshow(m.numpy(), vmin=0, vmax=vmax, cmap="magma", interpolation="nearest")
        ax.set_title(f"scale {k} ({m.shape[0]}x{m.shape[1]})", fontsize=FONT)
        ax.set(xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(out / f"scale_{k:02d}.png", dpi=DPI)
        paths.append(out / f"scale_{k:02d}.png")
    label = name or report.get("family", "model")
    paths.append(save_maps_side_by_side([(label, report["maps"])], out / "all_scales.png", title=title or (
        f"{label}: P(prediction changes on own input), {report['num_samples']} samples")))
    return paths
