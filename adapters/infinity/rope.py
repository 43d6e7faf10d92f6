"""Infinity's 2-D RoPE (rope2d_normalized_by_hw = 2, spec §5.5).

Head width c: pairs (2m, 2m+1); pairs m < c/4 rotate by row_pos * w_m, pairs m >= c/4 by
col_pos * w_(m - c/4), w_i = 1 / 10000^(2i / (c/2)). Token (r, col) of a (h, w) scale sits
at (round(r * Hn / h), round(col * Wn / w)) with (Hn, Wn) the template's 1M last grid
(float32 products, half-to-even rounding). Applied to q and k after cosine normalisation.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from einops import rearrange

from sar_core.schedule import Schedule


def _positions(n: int, grid: int) -> torch.Tensor:
    return torch.round(torch.arange(n, dtype=torch.float32) * (grid / n))


@lru_cache(maxsize=64)
def rope_table(schedule: Schedule, grid: tuple[int, int], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (L, c/2): the angle of every pair of every token of ``schedule``."""
    half = head_dim // 2
    omega = 1.0 / (10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half))  # (c/4,)
    angles = []
    for h, w in schedule:
        rows = _positions(h, grid[0])[:, None].expand(h, w).reshape(-1)
        cols = _positions(w, grid[1])[None, :].expand(h, w).reshape(-1)
        angles.append(torch.cat([rows[:, None] * omega, cols[:, None] * omega], dim=1))
    a = torch.cat(angles, 0)
    return a.cos(), a.sin()


def apply_rope(x_BHLc: torch.Tensor, cos_Lp: torch.Tensor, sin_Lp: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of (B, nH, L, c) by the (L, c/2) angles."""
    pairs = rearrange(x_BHLc.float(), "b h l (p two) -> b h l p two", two=2)
    a, b = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_Lp.to(x_BHLc.device), sin_Lp.to(x_BHLc.device)
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rearrange(out, "b h l p two -> b h l (p two)").to(x_BHLc.dtype)
