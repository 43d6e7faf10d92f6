"""Infinity's text side (spec §4): RMS norm, attention pool, cross-attention memory.

A text condition is a dict in upstream's compact layout: ``kv_compact`` (sum(lens), Ct5)
float32 (the valid T5 rows of every prompt, concatenated), ``lens`` (B,) int64 and
``null`` (B,) bool. A null row stands for upstream's ``cfg_uncond[:len_i]`` (the learned
null text of that row's length); the backbone substitutes it, so the null condition and
condition dropout need nothing but flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def padded_to_compact(values_BNC: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    mask = torch.arange(values_BNC.shape[1], device=values_BNC.device)[None] < lengths_B.to(values_BNC.device)[:, None]
    return values_BNC[mask]


def compact_to_padded(kv_NC: torch.Tensor, lens_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) -> (B, Nmax, C) zero-padded, and the (B, Nmax) validity mask."""
    lens = lens_B.to(kv_NC.device)
    n = int(lens.max()) if lens.numel() else 0
    mask = torch.arange(n, device=kv_NC.device)[None] < lens[:, None]
    out = kv_NC.new_zeros(lens.shape[0], n, kv_NC.shape[-1])
    out[mask] = kv_NC
    return out, mask


def text_condition(kv_compact: torch.Tensor, lens, null=None) -> dict:
    lens = torch.as_tensor(lens, dtype=torch.int64)
    if null is None:
        null = torch.zeros(lens.shape[0], dtype=torch.bool)
    if int(lens.sum()) != kv_compact.shape[0]:
        raise ValueError(f"text features have {kv_compact.shape[0]} rows but the lengths sum to {int(lens.sum())}")
    if (lens < 1).any():
        raise ValueError("every prompt needs at least one text feature row")
    return {"kv_compact": kv_compact.float(), "lens": lens, "null": torch.as_tensor(null, dtype=torch.bool)}


def cat_text(conds: list) -> dict:
    return {"kv_compact": torch.cat([c["kv_compact"] for c in conds], 0),
            "lens": torch.cat([c["lens"] for c in conds], 0),
            "null": torch.cat([c["null"] for c in conds], 0)}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class PoolAttention(nn.Module):
    """Learned-query attention pool: ``mat_q`` (1, nHp, C/nHp), kv from Ct5, ``proj``."""

    def __init__(self, ct5: int, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.mat_q = nn.Parameter(torch.zeros(1, heads, dim // heads))
        self.mat_kv = nn.Linear(ct5, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, t_NC: torch.Tensor, lens_B: torch.Tensor) -> torch.Tensor:
        kv = F.linear(t_NC, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        kv_BN2hc, mask = compact_to_padded(kv, lens_B)
        k, v = rearrange(kv_BN2hc, "b n (two h c) -> two b h n c", two=2, h=self.heads)
        q = self.mat_q.unsqueeze(2).expand(k.shape[0], -1, -1, -1)  # (B, h, 1, c)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.proj(rearrange(o, "b h 1 c -> b (h c)"))


class TextPool(nn.Module):
    def __init__(self, ct5: int, dim: int, heads: int):
        super().__init__()
        self.ca = PoolAttention(ct5, dim, heads)

    def forward(self, t_NC, lens_B):
        return self.ca(t_NC, lens_B)


class CrossAttention(nn.Module):
    """Image queries attend to their own prompt's text rows (varlen attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.mat_q = nn.Linear(dim, dim)
        self.mat_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLC: torch.Tensor, ca_kv: tuple) -> torch.Tensor:
        kv_NC, lens_B = ca_kv
        q = rearrange(self.mat_q(x_BLC), "b l (h c) -> b h l c", h=self.heads)
        kv = F.linear(kv_NC, self.mat_kv.weight, torch.cat([self.zero_k_bias, self.v_bias]))
        kv_BN, mask = compact_to_padded(kv, lens_B)
        k, v = rearrange(kv_BN, "b n (two h c) -> two b h n c", two=2, h=self.heads)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None, None, :])
        return self.proj(rearrange(o, "b h l c -> b l (h c)"))
