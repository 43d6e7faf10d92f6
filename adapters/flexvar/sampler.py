"""FlexVAR's KV-cached sampler (upstream ``autoregressive_infer_cfg``), rule for rule.

Per scale si of n (side p): run the blocks on the current token map (2B rows: condition,
then null class), guide, sample, and feed bicubic(codewords of this scale -> next side)
as the next scale's input. Guidance:

* VAR style (default): t = cfg * si / min(n - 1, 9), or t = cfg once p > max_pn;
  logits = (1 + t) * cond - t * uncond (the ramp exceeds cfg past 10 scales, as upstream);
* LlamaGen style (``used_llamagen_cfg``): logits = uncond + cfg * (cond - uncond).

Scales above ``max_pn`` or outside the trained sides are sampled greedily (top-k 1).
One multinomial call per scale, so a seeded generator replays upstream's draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sar_core.sar.sampling import guide, sample_logits
from sar_core.schedule import Schedule

from .backbone import FlexVAR
from .tokenizer import VQModel

STANDARD_SIDES = frozenset({1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32})


@dataclass
class Sampled:
    codes: list                   # per scale (B, h*w) int64
    raw_images: torch.Tensor      # unclamped decoder output, nominally [-1, 1]
    guided_logits: list           # per scale (B, h*w, V), what the sampler drew from


def guidance_scale(si: int, n: int, side: int, cfg: float, max_pn: int) -> float:
    if side > max_pn:
        return cfg
    if n < 2:
        raise ValueError("FlexVAR's guidance ramp divides by min(n - 1, 9): a one-scale schedule "
                         "needs used_llamagen_cfg=True")
    return cfg * si / min(n - 1, 9)


def effective_top_k(side: int, top_k: int, max_pn: int) -> int:
    return 1 if side > max_pn or side not in STANDARD_SIDES else top_k


@torch.no_grad()
def sample(backbone: FlexVAR, tokenizer: VQModel, label_B: torch.Tensor, schedule: Schedule,
           cfg: float, top_k: int = 0, top_p: float = 0.0, generator: Optional[torch.Generator] = None,
           max_pn: int = 16, used_llamagen_cfg: bool = False,
           invalid_ids: Optional[Sequence[int] | torch.Tensor] = None) -> Sampled:
    if not schedule.is_square:
        raise ValueError(f"FlexVAR samples square scales only, got {schedule}")
    if schedule.first_len != 1:
        raise ValueError(f"FlexVAR schedules start with a 1x1 scale, got {schedule}")
    B, n = label_B.shape[0], len(schedule)
    label_2B = torch.cat((label_B, backbone.null_labels(label_B)))
    cond_BD = backbone.class_emb(label_2B)
    pos = backbone.positions(schedule)
    x = cond_BD.unsqueeze(1) + backbone.pos_start + pos[:, :1]
    codes, guided = [], []
    backbone.kv_caching(True)
    try:
        for si, hw in enumerate(schedule):
            side = hw[0]
            logits = backbone.logits(backbone.run_blocks(x, cond_BD, None), cond_BD)
            if invalid_ids is not None:
                logits[:, :, invalid_ids] = -100.0
            cond, uncond = logits[:B], logits[B:]
            if used_llamagen_cfg:
                logits = uncond + (cond - uncond) * cfg
            else:
                logits = guide(cond, uncond, guidance_scale(si, n, side, cfg, max_pn))
            guided.append(logits)
            idx = sample_logits(logits, effective_top_k(side, top_k, max_pn), top_p, generator)
            codes.append(idx)
            if si + 1 < n:
                nxt = schedule[si + 1]
                words = backbone.word_embed(tokenizer.upsampled_input(idx, hw, nxt))
                sl = schedule.slice(si + 1)
                x = (words + pos[:, sl]).repeat(2, 1, 1)
    finally:
        backbone.kv_caching(False)
    raw = tokenizer.decode_indices(codes[-1], schedule[-1])
    return Sampled(codes, raw, guided)
