"""Pictures sized to be read: labelled sample grids and difference maps side by side.

Sample grids are upscaled (nearest, so every generated pixel stays a visible block) to at
least :data:`MIN_CELL_PX` pixels a side and labelled: a column title per class, or the
prompt of every cell for text-conditioned models; one block of rows per model when
models are shown side by side (same labels and sampling seed in every block). Maps show
each scale's token grid at least :data:`MAP_PX_PER_TOKEN` pixels per token (and
:data:`MIN_MAP_PX` a side), one row per model on one colour scale, then one row of
``model - reference`` per other model on a symmetric diverging scale. Fonts are at least
:data:`FONT` points at 100 dpi.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import torch

MIN_CELL_PX = 96        # a sample is drawn at least this many pixels a side
MAP_PX_PER_TOKEN = 3    # a difference map shows a token as at least 3 x 3 pixels
MIN_MAP_PX = 120        # ... and a map panel at least this many pixels a side
FONT = 10
DPI = 100


def figure(width_in: float, height_in: float, dpi: int = DPI):
    """A matplotlib Figure on an Agg canvas: no display, pyplot's global state untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as an image atomically (temp file, rename: a reader never sees half a
    PNG); the format follows the extension."""
    from sar_core.checkpoint_io import atomic_write_bytes

    p = Path(path)
    fmt = p.suffix.lstrip(".").lower() or "png"
    return atomic_write_bytes(lambda fh: fig.savefig(fh, format=fmt, dpi=fig.dpi), p)



def _short(text: str, width: int = 18, lines: int = 2) -> str:
    return "\n".join(textwrap.wrap(str(text), width)[:lines]) or "-"


def save_labelled_grid(blocks: Sequence[tuple[Optional[str], torch.Tensor]], path: str | Path, ncol: int, *,
                       column_titles: Optional[Sequence[str]] = None,
                       cell_titles: Optional[Sequence[str]] = None, title: str = "") -> Path:
    """One PNG: every block (name, float images (n, 3, H, W) in [0, 1]) laid out row-major,
    ``ncol`` a row; the blocks stacked, each row titled with its block's name. Labels:
    ``column_titles`` (one per column, e.g. class names) over the first row, or
    ``cell_titles`` (one per image of a block, e.g. prompts) over every cell."""
    if not blocks or any(len(images) == 0 for _, images in blocks):
        raise ValueError("a grid needs images in every block")
    h, w = blocks[0][1].shape[-2:]
    scale = max(1, -(-MIN_CELL_PX // max(h, w)))
    cell_w, cell_h = w * scale / DPI, h * scale / DPI
    label_h = 0.42 if cell_titles is not None else 0.08
    rows = [(name, images[i:i + ncol], i) for name, images in blocks for i in range(0, len(images), ncol)]
    left = 1.3 if any(name for name, _ in blocks) else 0.1
    top = (0.35 if column_titles is not None else 0.05) + (0.35 if title else 0.0)
    fig = figure(left + ncol * (cell_w + 0.06), top + len(rows) * (cell_h + label_h))
    W, H = fig.get_size_inches()
    for r, (name, images, start) in enumerate(rows):
        y0 = H - top - (r + 1) * (cell_h + label_h) + 0.02
        for c, img in enumerate(images):
            ax = fig.add_axes([(left + c * (cell_w + 0.06)) / W, y0 / H, cell_w / W, cell_h / H])
            ax.imshow(img.float().clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if cell_titles is not None:
                ax.set_title(_short(cell_titles[start + c]), fontsize=FONT - 2, pad=2)
            if r == 0 and column_titles is not None:
                ax.set_title(str(column_titles[c]), fontsize=FONT + 1, pad=3)
        if name and start == 0:
            fig.text(0.08 / W, (y0 + cell_h / 2) / H, _short(name, 16), fontsize=FONT, va="center", ha="left")
    if title:
        fig.text(0.5, 1 - 0.18 / H, title, fontsize=FONT + 1, ha="center", va="center")
    return save_figure(fig, path)


def map_panel_inches(h: int, w: int) -> tuple[float, float]:
    """(width, height) in inches of one map panel: >= 3 px per token, >= MIN_MAP_PX a side."""
    s = max(MIN_MAP_PX, MAP_PX_PER_TOKEN * max(h, w)) / DPI
    return s * w / max(h, w), s * h / max(h, w)


def save_maps_side_by_side(models: Sequence[tuple[str, list]], path: str | Path, title: str = "") -> Path:
    """One PNG of per-scale difference maps: a row per model (``maps``: [None, (h, w), ...]
    as :func:`sar_core.evaluate.diagnostics.exposure_gap` returns), one colour scale for all,
    then a row ``name - first`` per other model (diverging, symmetric about 0)."""
    ref_name, ref = models[0]
    ks = [k for k, m in enumerate(ref) if m is not None]
    rows = [(name, [maps[k] for k in ks], False) for name, maps in models]
    rows += [(f"{name} - {ref_name}", [maps[k] - ref[k] for k in ks], True) for name, maps in models[1:]]
    sizes = [map_panel_inches(*ref[k].shape) for k in ks]
    width = 1.6 + sum(s[0] + 0.25 for s in sizes) + 0.9
    row_h = max(s[1] for s in sizes) + 0.45
    fig = figure(width, 0.5 + len(rows) * row_h)
    W, H = fig.get_size_inches()
    vmax = max(float(m.max()) for _, maps, diff in rows if not diff for m in maps) or 1.0
    dmax = max([float(m.abs().max()) for _, maps, diff in rows if diff for m in maps] + [1e-6])
    for r, (name, maps, diff) in enumerate(rows):
        x, y0 = 1.6, H - 0.5 - (r + 1) * row_h + 0.1
        for (k, m), (pw, ph) in zip(zip(ks, maps), sizes):
            ax = fig.add_axes([x / W, y0 / H, pw / W, ph / H])
            im = ax.imshow(m.float().numpy(), cmap="RdBu_r" if diff else "magma", interpolation="nearest",
                           vmin=-dmax if diff else 0, vmax=dmax if diff else vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"scale {k} ({m.shape[0]}x{m.shape[1]}): {float(m.mean()):+.3f}" if diff else
                         f"scale {k} ({m.shape[0]}x{m.shape[1]}): {float(m.mean()):.3f}", fontsize=FONT - 1, pad=2)
            x += pw + 0.25
        cax = fig.add_axes([(x + 0.05) / W, y0 / H, 0.12 / W, sizes[-1][1] / H])
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=FONT - 2)
        fig.text(0.08 / W, (y0 + sizes[0][1] / 2) / H, _short(name, 18, 3), fontsize=FONT, va="center")
    fig.text(0.5, 1 - 0.22 / H, title or "P(argmax on own input != argmax on ground-truth input) per token",
             fontsize=FONT + 1, ha="center", va="center")
    return save_figure(fig, path)
