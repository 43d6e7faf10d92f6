"""Multi-scale residual binary spherical quantisation (spec §3.3-3.5, §7.1).

Maps are 5-D (B, d, 1, h, w) as upstream (t = 1): residuals are downsized with *area*
interpolation, codes and accumulations are resized with 5-D *trilinear* interpolation
(a 4-D bilinear call differs by ~1 ulp and could flip a sign test), the last scale is
never resized. Bits are int64 (B, h*w, d) row-major per scale; bit j is code channel j.

Bitwise Self-Correction (BSC) flips bits of the first ``layers`` scales and re-quantises
later scales against the corrupted history; its codes are a :class:`BitCodes` whose
``history`` holds the bits that were actually accumulated, so teacher-forcing and
stagger inputs are built on the same (corrupted) history as upstream's training input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from sar_core.schedule import Schedule


class BitCodes(list):
    """Per-scale label bits plus, under BSC, the bits the history was built from."""

    def __init__(self, labels, history: Optional[list] = None):
        super().__init__(labels)
        self.history = history


def history_of(codes: list) -> list:
    h = codes.history if isinstance(codes, BitCodes) else None
    return list(codes) if h is None else list(h)


def up(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """5-D trilinear resize of (B, d, 1, h, w) to (1, *hw)."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    return F.interpolate(x, size=(1, *hw), mode="trilinear", align_corners=False)


def area(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=(1, *hw), mode="area")


def quantise(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale of BSQ: residual (B, d, 1, h, w) -> (straight-through codes, bits (B, h*w, d))."""
    d = r.shape[1]
    u = F.normalize(r, dim=1, eps=1e-12)
    s = 1.0 / d ** 0.5
    zq = torch.where(u > 0, torch.full_like(u, s), torch.full_like(u, -s))
    q = u + (zq - u)
    bits = rearrange((q > 0).long(), "b d t h w -> b (t h w) d")
    return q, bits


def codes_of_bits(bits_BLd: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bits (B, h*w, d) -> unit codes (B, d, 1, h, w): b*2s - s, then L2-normalised."""
    d = bits_BLd.shape[-1]
    s = 1.0 / d ** 0.5
    c = bits_BLd.float() * (2 * s) - s
    c = F.normalize(c, dim=-1)
    return rearrange(c, "b (h w) d -> b d 1 h w", h=hw[0], w=hw[1])


def flat(x_Bd1hw: torch.Tensor) -> torch.Tensor:
    return rearrange(x_Bd1hw, "b d t h w -> b (t h w) d")


@dataclass
class Quantised:
    labels: list            # clean bits per scale (B, l_k, d)
    history: list           # bits accumulated per scale (= labels without BSC)
    inputs: torch.Tensor    # teacher-forcing input (B, L - 1, d)
    fhat: torch.Tensor      # (B, d, 1, H, W) accumulated codes
    flip_masks: list        # per noised scale (B, l_k, d) bool


def multiscale(f_BdHW: torch.Tensor, schedule: Schedule, flip_masks: Optional[Sequence] = None,
               bsc_layers: int = 0, bsc_strength: float = 0.0, requant: bool = True) -> Quantised:
    """The training quantisation loop (upstream ``flip_requant``), float32, no grad.

    ``flip_masks`` (given per noised scale) replaces the random BSC draws."""
    f = f_BdHW.float().unsqueeze(2)
    H, W = schedule[-1]
    if tuple(f.shape[-2:]) != (H, W):
        raise ValueError(f"tokenizer features are {tuple(f.shape[-2:])} but schedule {schedule} ends at {(H, W)}")
    K = len(schedule)
    n_noise = len(flip_masks) if flip_masks is not None else min(bsc_layers, K)
    S = torch.zeros_like(f)
    labels, history, inputs, masks = [], [], [], []
    for k, hw in enumerate(schedule):
        r = f - S
        if k < K - 1:
            r = area(r, hw)
        q, bits = quantise(r)
        labels.append(bits)
        used = bits
        if k < n_noise:
            mask = _mask(flip_masks, k, bits, bsc_strength)
            masks.append(mask)
            if requant:
                used = bits ^ mask.long()
                q = codes_of_bits(used, hw)
        history.append(used)
        S = S + up(q, (H, W))
        if k < K - 1:
            inputs.append(flat(up(S, schedule[k + 1])))
    x = torch.cat(inputs, 1) if inputs else f.new_zeros(f.shape[0], 0, f.shape[1])
    return Quantised(labels, history, x, S, masks)


def _mask(flip_masks, k: int, bits: torch.Tensor, strength: float) -> torch.Tensor:
    if flip_masks is not None:
        return torch.as_tensor(flip_masks[k], device=bits.device).bool().reshape(bits.shape)
    p = np.random.randint(0, int(round(strength * 100)) + 1) * 0.01   # upstream: numpy, shared by the batch
    return (torch.rand(bits.shape) < p).to(bits.device)                # upstream: torch CPU RNG


def accumulate(bits: Sequence[torch.Tensor], schedule: Schedule, upto: int) -> torch.Tensor:
    """Σ_{k < upto} trilinear(codes(bits_k) -> last grid), (B, d, 1, H, W)."""
    H, W = schedule[-1]
    S = None
    for k in range(upto):
        c = up(codes_of_bits(bits[k], schedule[k]), (H, W))
        S = c if S is None else S + c
    return S


def next_inputs(history: Sequence[torch.Tensor], schedule: Schedule,
                replace: Optional[dict] = None) -> torch.Tensor:
    """Inputs of scales 1..K-1 from per-scale bits, as the sampler builds them.

    ``replace`` maps k -> predicted bits at k: the input of scale k+1 is then built from
    the history below k plus the prediction at k (SSR's stagger input)."""
    replace = replace or {}
    H, W = schedule[-1]
    K = len(schedule)
    B, d = history[0].shape[0], history[0].shape[-1]
    S = history[0].new_zeros(B, d, 1, H, W, dtype=torch.float32)
    parts = []
    for k in range(K - 1):
        base = S
        S = S + up(codes_of_bits(history[k], schedule[k]), (H, W))
        src = S if k not in replace else base + up(codes_of_bits(replace[k], schedule[k]), (H, W))
        parts.append(flat(up(src, schedule[k + 1])))
    return torch.cat(parts, 1) if parts else S.new_zeros(B, 0, d)


def summed_codes(bits: Sequence[torch.Tensor], schedule: Schedule) -> torch.Tensor:
    """Decoder input (B, d, H, W) from every scale's bits."""
    return accumulate(bits, schedule, len(schedule)).squeeze(2)
