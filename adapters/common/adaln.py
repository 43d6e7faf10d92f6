"""The AdaLN transformer block shared by the VAR family (VAR, FlexVAR).

Parameter names match upstream state dicts exactly:
``attn.{mat_qkv.weight, q_bias, v_bias, zero_k_bias, scale_mul_1H11, proj.*}``,
``ffn.{fc1,fc2}.*``, ``ada_lin.1.*`` (or ``ada_gss`` with a shared AdaLN), and the head's
``ada_lin.1.*``. Attention goes through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth, active in train mode only."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Multi-head attention with L2-normalised q/k and a learned per-head temperature.

    With ``attn_l2_norm`` the softmax scale is 1 and q is multiplied by
    exp(min(scale_mul, ln 100)); otherwise the scale is 0.25 / sqrt(head_dim).
    A KV cache (``kv_caching(True)``) lets samplers feed one scale at a time.
    """

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        assert dim % num_heads == 0
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.caching = False
        self.cached_k: Optional[torch.Tensor] = None
        self.cached_v: Optional[torch.Tensor] = None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor], kv=None) -> torch.Tensor:
        """``kv``: a :mod:`sar_core.sar.prefix_cache` layer slot that records this pass's
        prefix keys / values, or prepends recorded ones (then ``attn_bias`` has one row
        per token of ``x`` and one column per key)."""
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias)
        q, k, v = rearrange(qkv, "b l (three h c) -> three b h l c", three=3, h=self.num_heads)
        if self.attn_l2_norm:
            mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(mul)
            k = F.normalize(k, dim=-1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        if kv is not None:
            k, v = kv(k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(rearrange(out, "b h l c -> b l (h c)"))


class AdaLNSelfAttn(nn.Module):
    """One block: AdaLN-modulated attention and FFN with gated residuals.

    Modulation chunks are ordered gamma1, gamma2, scale1, scale2, shift1, shift2.
    """

    def __init__(self, dim: int, cond_dim: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop_path: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 attn_l2_norm: bool = True):
        super().__init__()
        self.dim = dim
        self.attn = SelfAttention(dim, num_heads, attn_l2_norm)
        self.ffn = FFN(dim, round(dim * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor, attn_bias: Optional[torch.Tensor],
                kv=None) -> torch.Tensor:
        if self.shared_aln:  # cond_BD is already shared_ada_lin(cond) viewed (B, 1, 6, C)
            ada = self.ada_gss + cond_BD
        else:
            ada = self.ada_lin(cond_BD).view(-1, 1, 6, self.dim)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
        h = self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1)
        x = x + self.drop_path(self.attn(h, attn_bias, kv).mul(gamma1))  # not in place: selective
        # activation checkpointing keeps the projection's output
        h = self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)
        x = x + self.drop_path(self.ffn(h).mul(gamma2))
        return x


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN before the head; chunks ordered scale, shift."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.dim).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


def set_kv_caching(blocks: nn.ModuleList, enable: bool) -> None:
    for b in blocks:
        b.attn.kv_caching(enable)


class SharedAdaLin(nn.Linear):
    """Shared AdaLN projection (``shared_aln``); output viewed (B, 1, 6, C) like upstream."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)
