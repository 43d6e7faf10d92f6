"""KV-cached generation as upstream's ``autoregressive_infer_cfg`` (spec §8).

Rows are doubled (condition, then null condition) when any scale's cfg != 1. Per scale
k: the scale's tokens get ``lvl_embed[k]`` and run the blocks with scale k's RoPE
angles against the cached keys of every coarser scale (no mask). Guidance: insertion 0
mixes logits, ``cfg * cond + (1 - cfg) * uncond`` after dividing both by tau; a negative
insertion -n mixes the hidden state after block depth - n (written into both halves);
insertion 1 applies none. Bits are drawn per bit (2-way top-k / top-p, one multinomial
per bit) with the caller's generator; codes accumulate at the last grid (trilinear),
the next input is the accumulation resized to the next grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from einops import rearrange

from sar_core.sar.sampling import sample_logits
from sar_core.schedule import Schedule
from sar_core.tokens import group_logits

from . import bsq
from .patchify import TokenGrid
from .text import cat_text


@dataclass
class Sampled:
    bits: list            # per scale (B, l_k, d) int64
    guided_logits: list   # per scale (B, l_k, 2d) float32, what the sampler saw
    summed: torch.Tensor  # (B, d, H, W) accumulated codes


def _per_scale(value, K: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * K
    vals = [float(v) for v in value]
    if len(vals) != K:
        raise ValueError(f"{name} has {len(vals)} entries for a {K}-scale schedule")
    return vals


def sample_bits(lg_BLV: torch.Tensor, bits: int, top_k: int, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """Guided logits (B, l, 2d) -> bits (B, l, d): one 2-way draw per bit."""
    return sample_logits(group_logits(lg_BLV, bits), top_k, top_p, generator)


def _hidden_guidance(B: int, cfg: float, at: int):
    """Mix the hidden state after block ``at`` and write it into both halves."""
    def after(i: int, x: torch.Tensor) -> torch.Tensor:
        if i != at:
            return x
        mixed = cfg * x[:B] + (1 - cfg) * x[B:]
        return torch.cat([mixed, mixed], 0)
    return after


@torch.no_grad()
def generate(model, cond: dict, null: dict, schedule: Schedule, cfg, tau, top_k: int, top_p: float,
             generator: Optional[torch.Generator], insertion: int = 0,
             gt_leak: Sequence[torch.Tensor] = (), grid: Optional[TokenGrid] = None) -> Sampled:
    grid = grid or TokenGrid(1)
    K, d = len(schedule), model.bits // grid.f ** 2   # d: tokenizer bits (codes), model.bits per token
    cfgs, taus = _per_scale(cfg, K, "cfg"), _per_scale(tau, K, "tau")
    guided = any(c != 1 for c in cfgs)
    B = int(cond["lens"].shape[0])
    rows = cat_text([cond, null]) if guided else cond
    cond_BD, ca_kv, table = model.encode_text(rows)
    H, W = grid.tok_hw(schedule[-1])
    cos, sin = model.rope(schedule)
    blocks = model.all_blocks()
    for b in blocks:
        b.sa.kv_caching(True)
    try:
        x = (cond_BD + model.pos_start[0]).unsqueeze(1)
        S = x.new_zeros(B, d, 1, H, W, dtype=torch.float32)
        out_bits, out_logits = [], []
        for k, hw in enumerate(schedule):
            sl = schedule.slice(k)
            x = x + model.lvl_embed.weight[k]
            rope = (cos[sl], sin[sl])
            mix = _hidden_guidance(B, cfgs[k], len(blocks) + insertion - 1) if guided and insertion < 0 else None
            x = model.run_blocks(x, table, ca_kv, None, rope, mix)
            if guided and insertion == 0:
                lg = model.logits(x, cond_BD) / taus[k]
                lg = cfgs[k] * lg[:B] + (1 - cfgs[k]) * lg[B:]
            else:
                lg = model.logits(x[:B], cond_BD[:B]) / taus[k]
            out_logits.append(lg)
            bits = sample_bits(lg, model.bits, top_k, top_p, generator)
            if k < len(gt_leak):
                bits = torch.as_tensor(gt_leak[k], device=bits.device).long()
            out_bits.append(bits)
            c = bsq.codes_of_bits(grid.to_tok(bits, hw), grid.tok_hw(hw))
            if k < K - 1:
                S = S + bsq.up(c, (H, W))
                nxt = grid.to_model(bsq.flat(bsq.up(S, grid.tok_hw(schedule[k + 1]))), schedule[k + 1])
                x = model.word_embed(nxt)
                if guided:
                    x = torch.cat([x, x], 0)
            else:
                S = S + c
    finally:
        for b in blocks:
            b.sa.kv_caching(False)
    return Sampled(out_bits, out_logits, S.squeeze(2))


def to_uint8_bgr(images_B3HW: torch.Tensor) -> torch.Tensor:
    """Upstream's returned image: ((x + 1) / 2 * 255) truncated, (B, H, W, 3) BGR uint8."""
    img = (images_B3HW.clamp(-1, 1) + 1) / 2 * 255
    return rearrange(img, "b c h w -> b h w c").flip(-1).to(torch.uint8)
