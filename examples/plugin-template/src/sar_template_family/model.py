"""The template family's two modules. Replace them with your upstream code.

* Tokenizer: a strided conv to a latent of ``latent_dim`` channels; scale k is the latent
  area-pooled to the scale's side and quantised to the nearest codeword; the input of
  scale k+1 is scale k's codewords bilinearly resized to its side.
* Backbone: class token (+ ``pos_start``, left out by the official student-forcing pass),
  word embedding of the inputs, a level embedding per scale side, AdaLN transformer blocks
  reused from ``sar_adapters.common.adaln`` (stable for reuse, docs/plugins.md) under the
  block-causal mask, and a head. ``init_weights`` is the upstream-style init: near-identity
  blocks, which is why the contract suite livens the weights before it checks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from sar_adapters.common.adaln import AdaLNBeforeHead, AdaLNSelfAttn
from sar_adapters.common.conditions import drop_labels
from sar_adapters.common.init import init_adaln_transformer
from sar_core.adapter import AdapterConfig
from sar_core.schedule import Schedule
from torch import nn


class TemplateConfig(AdapterConfig):
    vocab_size: int = 16
    latent_dim: int = 4
    sides: tuple[int, ...] = (1, 2, 3, 4)
    downsample: int = 2
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    num_classes: int = 10
    cond_drop_rate: float = 0.0


class Tokenizer(nn.Module):
    def __init__(self, cfg: TemplateConfig):
        super().__init__()
        self.enc = nn.Conv2d(3, cfg.latent_dim, cfg.downsample, stride=cfg.downsample)
        self.codebook = nn.Parameter(torch.randn(cfg.vocab_size, cfg.latent_dim))
        self.dec = nn.Linear(cfg.latent_dim, 3 * cfg.downsample ** 2)
        self.down = cfg.downsample

    def encode(self, images: torch.Tensor, sides: Sequence[int]) -> list:
        with torch.autocast(images.device.type, enabled=False):   # codes never depend on AMP
            f = self.enc(images.float())
            book = self.codebook.float()
            codes = []
            for s in sides:
                fs = rearrange(F.adaptive_avg_pool2d(f, s), "b c h w -> b (h w) c")
                codes.append(torch.cdist(fs, book[None].expand(len(fs), -1, -1)).argmin(-1))
        return codes

    def next_input(self, idx: torch.Tensor, side: int, nxt: int) -> torch.Tensor:
        """Codewords of one scale resized to the next scale's side: (B, nxt * nxt, latent_dim)."""
        with torch.autocast(idx.device.type, enabled=False):
            e = rearrange(self.codebook.float()[idx], "b (h w) c -> b c h w", h=side, w=side)
            e = F.interpolate(e, size=(nxt, nxt), mode="bilinear", align_corners=False)
        return rearrange(e, "b c h w -> b (h w) c")

    def inputs(self, codes: list, sides: Sequence[int]) -> torch.Tensor:
        return torch.cat([self.next_input(codes[k], sides[k], sides[k + 1]) for k in range(len(sides) - 1)], 1)

    def decode(self, idx: torch.Tensor, side: int) -> torch.Tensor:
        with torch.autocast(idx.device.type, enabled=False):
            px = self.dec(self.codebook.float()[idx])
        return rearrange(px, "b (h w) (c p q) -> b c (h p) (w q)", h=side, w=side, p=self.down, q=self.down).tanh()


class Backbone(nn.Module):
    def __init__(self, cfg: TemplateConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.num_classes, self.sides = C, cfg.num_classes, tuple(cfg.sides)
        self.cond_drop_rate = float(cfg.cond_drop_rate)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.word_embed = nn.Linear(cfg.latent_dim, C)
        self.lvl_embed = nn.Embedding(len(cfg.sides), C)
        self.blocks = nn.ModuleList(AdaLNSelfAttn(C, C, cfg.num_heads, mlp_ratio=2.0) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, C)
        self.head = nn.Linear(C, cfg.vocab_size)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Upstream-style: truncated normals, a small head, near-identity AdaLN gates."""
        std = math.sqrt(1 / self.C / 3)
        init_adaln_transformer(self, std, [(self.pos_start, std)], init_head=0.02, init_adaln=0.5,
                               init_adaln_gamma=1e-5)

    def levels(self, schedule: Schedule, device) -> torch.Tensor:
        """Level of every token: the index of its scale's side in ``sides``, so a
        sub-schedule (the official short pass [scale 0, scale k]) keeps each scale's level."""
        unknown = [h for h in schedule.sides if h not in self.sides]
        if unknown:
            raise ValueError(f"scale sides {unknown} are not among this model's sides {list(self.sides)}")
        lv = torch.tensor([self.sides.index(h) for h in schedule.sides], device=device)
        return torch.repeat_interleave(lv, torch.tensor(schedule.token_counts, device=device))

    def start(self, cond_BD: torch.Tensor, student_forcing: bool = False) -> torch.Tensor:
        sos = cond_BD[:, None]
        return sos if student_forcing else sos + self.pos_start

    def logits(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x, cond_BD)).float()

    def forward(self, cond: torch.Tensor, inputs: torch.Tensor, schedule: Schedule,
                student_forcing: bool = False) -> torch.Tensor:
        if schedule.first_len != 1:
            raise ValueError(f"template schedules start with a 1x1 scale, got {schedule}")
        if inputs.shape[1] != schedule.total_tokens - 1:
            raise ValueError(f"inputs hold {inputs.shape[1]} tokens; schedule {schedule} needs "
                             f"{schedule.total_tokens - 1}")
        cond_BD = self.class_emb(drop_labels(cond.long(), self.cond_drop_rate, self.num_classes))
        x = torch.cat([self.start(cond_BD, student_forcing), self.word_embed(inputs.to(cond_BD.dtype))], 1)
        x = x + self.lvl_embed(self.levels(schedule, x.device))[None]
        bias = schedule.attention_bias(x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cond_BD, bias)
        return self.logits(x, cond_BD)
