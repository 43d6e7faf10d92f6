"""Infinity's BSQ-VAE ("BitVAE") CNN: encoder to d-channel features, decoder to pixels.

FLUX-style 2-D CNN without attention (spec §3.1). Convs and norms are wrapped so the
state-dict names match upstream (``….conv.weight``, ``….norm.weight``). The quantiser
has no parameters, only the integer-label ``mask`` buffer (registered under both
``quantizer.lfq`` and its alias ``quantize.lfq``); the quantisation itself lives in
:mod:`.bsq`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig


def groups_for(channels: int) -> int:
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise ValueError(f"tokenizer channel count {channels} is neither a multiple of 32 nor of 24 (GroupNorm)")


class Conv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding)

    def forward(self, x):
        return self.conv(x)


class Norm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups_for(channels), channels, eps=1e-6, affine=True)

    def forward(self, x):
        return self.norm(x)


def swish(x):
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Norm(cin), Conv(cin, cout)
        self.norm2, self.conv2 = Norm(cout), Conv(cout, cout)
        self.nin_shortcut = Conv(cin, cout, 1, 1, 0) if cin != cout else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = Conv(ch, ch)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1, self.block_2 = ResnetBlock(ch, ch), ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        ch, mult, nd = c.base_ch, c.ch_mult, c.num_down
        self.conv_in = Conv(3, ch)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else ch * m, ch * m)
                                         for j in range(c.num_res_blocks)])
            cin = ch * m
            if i < nd:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = Mid(cin)
        self.norm_out, self.conv_out = Norm(cin), Conv(cin, c.codebook_dim)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: TokenizerConfig):
        super().__init__()
        ch, mult, nd = c.base_ch, c.ch_mult, c.num_down
        cin = ch * mult[-1]
        self.conv_in = Conv(c.codebook_dim, cin)
        self.mid = Mid(cin)
        up = [None] * len(mult)
        for i in reversed(range(len(mult))):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else ch * mult[i], ch * mult[i])
                                         for j in range(c.num_res_blocks + 1)])
            cin = ch * mult[i]
            if 1 <= i <= nd:
                level.upsample = Upsample(cin)
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out, self.conv_out = Norm(cin), Conv(cin, 3)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LFQMask(nn.Module):
    """Holds upstream's integer-label ``mask`` buffer (2^(d-1), ..., 1); unused for bits."""

    def __init__(self, d: int):
        super().__init__()
        self.register_buffer("mask", 2 ** torch.arange(d - 1, -1, -1, dtype=torch.int64))


class Quantizer(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.lfq = LFQMask(d)


class BSQVAE(nn.Module):
    """Encoder + decoder; ``quantize`` is an alias of ``quantizer`` (both in state dicts)."""

    def __init__(self, c: TokenizerConfig):
        super().__init__()
        self.cfg = c
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quantizer = Quantizer(c.codebook_dim)
        self.quantize = self.quantizer

    @property
    def d(self) -> int:
        return self.cfg.codebook_dim

    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> float32 features (B, d, H/p, W/p)."""
        return self.encoder(images_B3HW.float()).float()

    def training_loss(self, images_B3HW: torch.Tensor, schedule, beta: float = 0.25) -> tuple[torch.Tensor, dict]:
        """Loss for fitting the tokenizer from scratch (``sar pretrain``; not upstream's
        recipe, which adds entropy terms and a GAN): multi-scale residual BSQ as in
        :func:`.bsq.multiscale` but straight-through (the unit-sphere projection keeps its
        gradient), L1 + MSE reconstruction of the summed codes, and ``beta`` times a
        commitment MSE of the features to the summed codes and of every projected residual
        to its binary corner."""
        from einops import rearrange

        from .bsq import area, up

        f = self.features(images_B3HW).unsqueeze(2)
        H, W = schedule[-1]
        S, corner = torch.zeros_like(f), f.new_zeros(())
        for k, hw in enumerate(schedule):
            r = f - S.detach()
            if k < len(schedule) - 1:
                r = area(r, hw)
            u = F.normalize(r, dim=1, eps=1e-12)
            zq = torch.where(u > 0, 1.0, -1.0).to(u) / self.d ** 0.5
            corner = corner + F.mse_loss(u, zq)
            S = S + up(u + (zq - u).detach(), (H, W))
        commit = F.mse_loss(f, S.detach()) + corner / len(schedule)
        rec = self.decoder(rearrange(S, "b d 1 h w -> b d h w"))
        l1, l2 = F.l1_loss(rec, images_B3HW), F.mse_loss(rec, images_B3HW)
        return l1 + l2 + beta * commit, {"rec_l1": l1.item(), "rec_mse": l2.item(), "commit": commit.item()}

    def decode_map(self, summed_BdHW: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, d, H, W) -> images clamped to [-1, 1]."""
        # upstream feeds the decoder a channels-last map (its codes come from (B, h, w, d) bits);
        # the same layout picks the same conv kernels, so decoded pixels match to the last ulp
        z = summed_BdHW.contiguous(memory_format=torch.channels_last)
        return self.decoder(z).clamp(-1, 1).contiguous()


def init_tokenizer(model: BSQVAE) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=math.sqrt(5))
            nn.init.zeros_(m.bias)
