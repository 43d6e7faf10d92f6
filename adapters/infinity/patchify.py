"""Spatial patchify (Infinity-8B, spec §3.7): the tokenizer works on a grid twice as fine
as the transformer's. Transformer bits / inputs of a (h, w) scale are pixel_unshuffle(2)
of the tokenizer's (2h, 2w) maps: channel 4c + 2i + j holds tokenizer channel c at
sub-position (i, j). Factor 1 (every other release) makes every map an identity.
"""

from __future__ import annotations

import torch
from einops import rearrange

from sar_core.schedule import Schedule


class TokenGrid:
    def __init__(self, factor: int = 1):
        if factor not in (1, 2):
            raise ValueError(f"spatial patchify factor must be 1 or 2, got {factor}")
        self.f = factor

    def tok_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw[0] * self.f, hw[1] * self.f

    def tok_schedule(self, schedule: Schedule) -> Schedule:
        return schedule if self.f == 1 else Schedule([self.tok_hw(hw) for hw in schedule])

    def to_model(self, x_BLd: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Tokenizer-grid rows (B, 4hw, d) -> transformer rows (B, hw, 4d)."""
        if self.f == 1:
            return x_BLd
        x = rearrange(x_BLd, "b (hh ww) d -> b hh ww d", hh=2 * hw[0])
        return rearrange(x, "b (h i) (w j) d -> b (h w) (d i j)", i=2, j=2)

    def to_tok(self, x_BLD: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if self.f == 1:
            return x_BLD
        x = rearrange(x_BLD, "b (h w) (d i j) -> b (h i) (w j) d", h=hw[0], i=2, j=2)
        return rearrange(x, "b hh ww d -> b (hh ww) d")

    def inputs_to_model(self, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
        """Concatenated tokenizer-grid inputs of scales 1..K-1 -> transformer rows."""
        if self.f == 1:
            return x
        tok = self.tok_schedule(schedule)
        parts = torch.split(x, list(tok.token_counts[1:]), dim=1)
        return torch.cat([self.to_model(p, schedule[k + 1]) for k, p in enumerate(parts)], dim=1)
