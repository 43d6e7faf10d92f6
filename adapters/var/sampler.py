"""VAR's KV-cached, classifier-free-guided sampler (var.md §4).

2B rows (condition, then null class) run scale by scale with every attention layer
caching keys and values; at scale si the guided logits are (1+t) cond - t uncond with
t = cfg * si / (SN - 1); one multinomial draw per scale (rows ordered batch, token), so a
seeded generator reproduces upstream's ``autoregressive_infer_cfg``.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange

from sar_adapters.common.adaln import set_kv_caching
from sar_core.adapter import Generation
from sar_core.sar.sampling import filter_top_k_top_p, guide, sample_logits
from sar_core.schedule import Schedule

from .backbone import VAR
from .tokenizer import VQVAE


def _gumbel_soft(logits: torch.Tensor, tau: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Soft Gumbel-softmax (upstream's more_smooth visualisation trick)."""
    noise = torch.empty_like(logits).exponential_(generator=generator).log().neg()
    return ((logits + noise) / tau).softmax(dim=-1)


@torch.no_grad()
def generate(var: VAR, vae: VQVAE, label_B: torch.Tensor, *, cfg: float = 1.5, top_k: int = 0,
             top_p: float = 0.0, generator: Optional[torch.Generator] = None,
             more_smooth: bool = False) -> Generation:
    """Sample one image per label; returns codes per scale, images in [0, 1], guided logits."""
    pn = var.patch_nums
    SN, B = len(pn), label_B.shape[0]
    dev = var.pos_1LC.device
    label_B = label_B.to(dev).long()
    label_B = torch.where(label_B < 0, torch.full_like(label_B, var.num_classes), label_B)
    schedule = Schedule(pn)

    cond_BD = var.class_emb(torch.cat((label_B, torch.full_like(label_B, var.num_classes))))
    lvl_pos = var.lvl_pos(schedule)
    offs = schedule.offsets
    x = (cond_BD.unsqueeze(1).expand(2 * B, var.first_l, -1)
         + var.pos_start.expand(2 * B, var.first_l, -1) + lvl_pos[:, :var.first_l])
    f_hat = torch.zeros(B, var.Cvae, pn[-1], pn[-1], device=dev)
    codebook = vae.quantize.embedding.weight
    codes, guided = [], []
    set_kv_caching(var.blocks, True)
    try:
        for si, side in enumerate(pn):
            ratio = si / (SN - 1) if SN > 1 else 0.0
            cond_gss = var.shared_ada_lin(cond_BD)
            for block in var.blocks:
                x = block(x, cond_gss, None)
            logits = var.get_logits(x, cond_BD)
            t = cfg * ratio
            logits_BlV = guide(logits[:B], logits[B:], t)
            guided.append(logits_BlV.clone())
            if not more_smooth:
                idx_Bl = sample_logits(logits_BlV, top_k, top_p, generator)
                h_BlC = vae.quantize.embedding(idx_Bl)
            else:
                filtered = filter_top_k_top_p(logits_BlV, top_k, top_p)
                idx_Bl = sample_logits(filtered, 0, 0.0, generator)
                tau = max(0.27 * (1 - ratio * 0.95), 0.005)
                h_BlC = _gumbel_soft(filtered.mul(1 + ratio), tau, generator) @ codebook.unsqueeze(0)
            codes.append(idx_Bl)
            h_BCpp = rearrange(h_BlC, "b (h w) c -> b c h w", h=side, w=side)
            nxt = vae.next_input(f_hat, h_BCpp, si, pn)
            if nxt is not None:
                x = var.word_embed(nxt) + lvl_pos[:, offs[si + 1]:offs[si + 2]]
                x = x.repeat(2, 1, 1)
    finally:
        set_kv_caching(var.blocks, False)
    images = vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
    return Generation(codes=codes, images=images, guided_logits=guided)
