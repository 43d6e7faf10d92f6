"""The Infinity transformer (text-to-image, bitwise head), upstream parameter names.

State-dict keys match ``Infinity.state_dict()`` (spec §5.2): ``cfg_uncond``,
``pos_start``, ``text_norm``, ``text_proj_for_sos.ca.*``, ``text_proj_for_ca.{0,2}``,
``lvl_embed``, ``word_embed``, ``shared_ada_lin.1``, ``block_chunks.{c}.module.{j}.*``
(``blocks.{i}`` when built with one chunk), ``head_nm.ada_lin.1``, ``head``.

Teacher forcing (spec §5.3): token 0 = pooled text + ``pos_start``; tokens 1.. =
``word_embed`` of the inputs; ``lvl_embed[k]`` added once before the first block;
block-causal mask; logits (B, L, 2d) with [logit(bit j = 0), logit(bit j = 1)] pairs.
"""

from __future__ import annotations

import math
import random
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sar_core.schedule import Schedule

from .blocks import Chunk, CrossAttnBlock
from .config import BackboneConfig
from .rope import rope_table
from .templates import TEMPLATES, scale_levels
from .text import RMSNorm, TextPool

NUM_LEVELS = 15


class HeadNorm(nn.Module):
    """AdaLN before the head: (scale, shift) from SiLU -> Linear(C, 2C)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, cond_BD):
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, x.shape[-1]).unbind(2)
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).mul(1 + scale).add(shift)


class Infinity(nn.Module):
    def __init__(self, cfg: BackboneConfig, bits: int, h_div_w: float = 1.0):
        super().__init__()
        self.cfg, self.bits, self.h_div_w = cfg, int(bits), float(h_div_w)
        C, ct5 = cfg.embed_dim, cfg.text_channels
        self.cond_drop_rate = cfg.cond_drop_rate
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(ct5, eps=1e-6)
        self.text_proj_for_sos = TextPool(ct5, C, cfg.text_pool_heads)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(NUM_LEVELS, C)
        self.word_embed = nn.Linear(self.bits, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        blocks = [CrossAttnBlock(C, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, dpr[i]) for i in range(cfg.depth)]
        per = cfg.depth // cfg.block_chunks
        if cfg.block_chunks > 1:
            self.block_chunks = nn.ModuleList([Chunk(blocks[c * per:(c + 1) * per]) for c in range(cfg.block_chunks)])
        else:
            self.blocks = nn.ModuleList(blocks)
        self.head_nm = HeadNorm(C, cfg.norm_eps)
        self.head = nn.Linear(C, 2 * self.bits)

    # ------------------------------------------------------------------ pieces
    def all_blocks(self) -> list:
        if self.cfg.block_chunks > 1:
            return [b for chunk in self.block_chunks for b in chunk.module]
        return list(self.blocks)

    def text_rows(self, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_compact with null rows replaced by cfg_uncond[:len_i], lens); applies
        condition dropout in training mode (Python ``random`` per row, as upstream)."""
        kv, lens = cond["kv_compact"].float(), cond["lens"].to(cond["kv_compact"].device)
        null = cond["null"].to(kv.device).clone()
        if self.training and self.cond_drop_rate > 0:
            drop = torch.tensor([random.random() < self.cond_drop_rate for _ in range(lens.shape[0])], device=kv.device)
            null |= drop
        if int(lens.max()) > self.cfg.text_maxlen and bool(null.any()):
            raise ValueError(f"a prompt has {int(lens.max())} text tokens but the null text holds "
                             f"{self.cfg.text_maxlen} (text_maxlen)")
        # always gathered, so cfg_uncond is part of every graph (DDP sees the same parameters
        # used in every step, whether or not a row was dropped)
        row = torch.repeat_interleave(torch.arange(lens.shape[0], device=kv.device), lens)
        start = torch.cumsum(lens, 0) - lens
        pos = (torch.arange(kv.shape[0], device=kv.device) - start[row]).clamp_max(self.cfg.text_maxlen - 1)
        return torch.where(null[row][:, None], self.cfg_uncond[pos].to(kv.dtype), kv), lens

    def encode_text(self, cond: dict) -> tuple[torch.Tensor, tuple, torch.Tensor]:
        """-> cond_BD (B, C), cross-attention memory (ca_kv (N, C), lens), AdaLN table (B, 1, 6, C)."""
        kv, lens = self.text_rows(cond)
        t = self.text_norm(kv)
        cond_BD = self.text_proj_for_sos(t, lens)
        ca_kv = self.text_proj_for_ca(t)
        table = self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.cfg.embed_dim)
        return cond_BD, (ca_kv, lens), table

    def rope(self, schedule: Schedule) -> tuple:
        ratio, _ = scale_levels(schedule, self.h_div_w)
        return rope_table(schedule, TEMPLATES[ratio][-1], self.cfg.embed_dim // self.cfg.num_heads)

    def levels(self, schedule: Schedule) -> list[int]:
        """Level index of every scale: its position in the template (k for a prefix)."""
        return scale_levels(schedule, self.h_div_w)[1]

    def run_blocks(self, x, table, ca_kv, bias, rope, after=None):
        """Every block in order, through the chunk modules (FSDP2's wrapping units);
        ``after(i, x) -> x`` runs after block i (the sampler's hidden-state guidance)."""
        if self.cfg.block_chunks == 1:
            for i, block in enumerate(self.blocks):
                x = block(x, table, ca_kv, bias, rope)
                x = x if after is None else after(i, x)
            return x
        per = self.cfg.depth // self.cfg.block_chunks
        for c, chunk in enumerate(self.block_chunks):
            x = chunk(x, table, ca_kv, bias, rope, after, c * per)
        return x

    def logits(self, x_BLC, cond_BD):
        return self.head(self.head_nm(x_BLC, cond_BD)).float()

    # ------------------------------------------------------------------ forward
    def forward(self, cond: dict, inputs: torch.Tensor, schedule, student_forcing: bool = False) -> torch.Tensor:
        schedule = Schedule.parse(schedule)
        if inputs.shape[1] != schedule.total_tokens - 1:
            raise ValueError(f"inputs have {inputs.shape[1]} tokens; schedule {schedule} needs "
                             f"{schedule.total_tokens - 1}")
        if len(schedule) > NUM_LEVELS:
            raise ValueError(f"at most {NUM_LEVELS} scales (level embedding), got {len(schedule)}")
        cond_BD, ca_kv, table = self.encode_text(cond)
        sos = cond_BD.unsqueeze(1) + (0 if student_forcing else self.pos_start)
        x = torch.cat([sos, self.word_embed(inputs.float())], dim=1)
        lv = torch.tensor(self.levels(schedule), device=x.device)
        ids = torch.repeat_interleave(lv, torch.tensor(schedule.token_counts, device=x.device))
        x = x + self.lvl_embed(ids)
        bias = schedule.attention_bias(x.device, x.dtype)
        rope = self.rope(schedule)
        x = self.run_blocks(x, table, ca_kv, bias, rope)
        return self.logits(x, cond_BD)


def init_weights(model: Infinity, seed: Optional[int] = None) -> None:
    """Upstream's initialisation (spec §5.8), for fresh models."""
    C, depth = model.cfg.embed_dim, model.cfg.depth
    std = math.sqrt(1 / (3 * C))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    ct5 = model.cfg.text_channels
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.cfg_uncond.copy_(torch.nn.init.trunc_normal_(torch.empty_like(model.cfg_uncond), std=1.2,
                                                           generator=g) / math.sqrt(ct5))
        for p in (model.pos_start, model.text_proj_for_sos.ca.mat_q):
            nn.init.trunc_normal_(p, std=std)
        model.head_nm.ada_lin[-1].weight.mul_(1e-3)
        model.head_nm.ada_lin[-1].bias.zero_()
        model.head.weight.mul_(0.02)
        model.head.bias.zero_()
        for b in model.all_blocks():
            for lin in (b.sa.proj, b.ca.proj, b.ffn.fc2):
                lin.weight.div_(math.sqrt(2 * depth))
            b.ada_gss.normal_(0, 1 / math.sqrt(C))
            b.ada_gss[:, :, :2].mul_(5e-6)
            b.ada_gss[:, :, 2:].mul_(1e-3)
