"""Infinity's CrossAttnBlock with shared AdaLN (spec §5.4-5.5).

(gamma1, gamma2, scale1, scale2, shift1, shift2) = (ada_gss + shared table).unbind(2);
x += gamma1 * SA(LN(x)(1 + scale1) + shift1); x += CA(ca_norm(x), text) (no gate);
x += gamma2 * FFN(LN(x)(1 + scale2) + shift2). Self-attention is cosine attention
(per-head learned temperature, softmax scale 1) with 2-D RoPE after the normalisation;
with caching on, keys/values (keys post-RoPE) accumulate scale by scale.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sar_adapters.common.adaln import FFN, DropPath

from .rope import apply_rope
from .text import CrossAttention

MAX_SCALE_MUL = math.log(100)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(dim, dim)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLC: torch.Tensor, bias: Optional[torch.Tensor], rope: tuple) -> torch.Tensor:
        bias_qkv = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias_qkv)
        q, k, v = rearrange(qkv, "b l (three h c) -> three b h l c", three=3, h=self.heads)
        scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()
        q = F.normalize(q, dim=-1).mul(scale)
        k = F.normalize(k, dim=-1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat([self.cached_k, k], dim=2)
                v = torch.cat([self.cached_v, v], dim=2)
            self.cached_k, self.cached_v = k, v
        mask = None if bias is None else bias.to(q.dtype)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=1.0)
        return self.proj(rearrange(o, "b h l c -> b l (h c)"))


class CrossAttnBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, eps: float, drop_path: float):
        super().__init__()
        self.eps = eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, dim))
        self.sa = SelfAttention(dim, heads)
        self.ca = CrossAttention(dim, heads)
        self.ffn = FFN(dim, hidden)
        self.ca_norm = nn.LayerNorm(dim, eps=eps)
        self.drop_path = DropPath(drop_path)

    def _ln(self, x):
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)

    def forward(self, x, table_B16C, ca_kv, bias, rope):
        g1, g2, s1, s2, t1, t2 = (self.ada_gss + table_B16C).unbind(2)
        x = x + self.drop_path(self.sa(self._ln(x).mul(1 + s1).add(t1), bias, rope).mul(g1))
        x = x + self.ca(self.ca_norm(x), ca_kv)
        x = x + self.drop_path(self.ffn(self._ln(x).mul(1 + s2).add(t2)).mul(g2))
        return x


class Chunk(nn.Module):
    """One FSDP wrapping unit of upstream (``block_chunks.{c}.module.{j}``). The blocks sit
    in a Sequential (iterated, never called), not a ModuleList, so FSDP2 shards whole chunks
    as upstream does instead of nesting a block inside an already sharded chunk."""

    def __init__(self, blocks: list):
        super().__init__()
        self.module = nn.Sequential(*blocks)

    def forward(self, x, table, ca_kv, bias, rope, after=None, first: int = 0):
        """Run the chunk's blocks; ``after(i, x) -> x`` is called after block ``first + i``."""
        for i, block in enumerate(self.module):
            x = block(x, table, ca_kv, bias, rope)
            if after is not None:
                x = after(first + i, x)
        return x
