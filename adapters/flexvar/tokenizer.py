"""FlexVAE: LlamaGen's VQModel, applied one scale at a time (no residual quantisation).

Parameter names match the upstream state dict (``encoder.conv_blocks.{i}.res/attn/
downsample``, ``mid.{0,1,2}``, 1x1 ``quant_conv`` / ``post_quant_conv``, decoder
``conv_blocks.{j}`` with j = 0 the lowest resolution, ``quantize.embedding.weight`` and
the usage buffer ``quantize.codebook_used``).

The codebook is L2-normalised at every use. Per scale, the continuous latent is
area-downsampled and quantised independently (trainer order: quant_conv, then area);
the teacher-forcing input of scale s+1 is the bicubic upsampling of scale s's normalised
codewords. Only the last scale is decoded.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TokenizerConfig

CODEBOOK_USED_LEN = 65536


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 q / k / v convs."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v = (nn.Conv2d(c, c, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q = rearrange(self.q(hn), "b c h w -> b (h w) c")
        k = rearrange(self.k(hn), "b c h w -> b c (h w)")
        v = rearrange(self.v(hn), "b c h w -> b c (h w)")
        attn = torch.bmm(q, k).mul(c ** -0.5).softmax(dim=2)       # (b, q, k)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list, attn: list, resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.res, level.attn = nn.ModuleList(res), nn.ModuleList(attn)
    if resample is not None:
        level.add_module(name, resample)
    return level


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        last = len(mult) - 1
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = ch
        for i, m in enumerate(mult):
            cout = ch * m
            res = [ResnetBlock(cin if j == 0 else cout, cout) for j in range(n)]
            attn = [AttnBlock(cout) for _ in range(n)] if i == last else []
            self.conv_blocks.append(_level(res, attn, Downsample(cout) if i < last else None, "downsample"))
            cin = cout
        self.mid = _mid(cin)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_blocks[0] runs first, at the lowest resolution (the reverse of ch_mult)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid(cin)
        self.conv_blocks = nn.ModuleList()
        for j, m in enumerate(reversed(mult)):
            cout = ch * m
            res = [ResnetBlock(cin if r == 0 else cout, cout) for r in range(n + 1)]
            attn = [AttnBlock(cout) for _ in range(n + 1)] if j == 0 else []
            up = Upsample(cout) if j < len(mult) - 1 else None
            self.conv_blocks.append(_level(res, attn, up, "upsample"))
            cin = cout
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest L2-normalised codeword of the L2-normalised latent."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.register_buffer("codebook_used", torch.zeros(CODEBOOK_USED_LEN))

    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def indices(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latent -> (B, h*w) int64, row-major; ties go to the first index."""
        z = F.normalize(rearrange(z_BChw, "b c h w -> (b h w) c"), p=2, dim=-1)
        e = self.codebook()
        dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * (z @ e.t())
        return dist.argmin(dim=1).view(z_BChw.shape[0], -1)


class VQModel(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.Cvae, self.vocab_size = cfg.codebook_embed_dim, cfg.codebook_size
        self.downsample = cfg.downsample
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    # ---------------------------------------------------------------- encoding
    def encode_latent(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """quant_conv(encoder(img)): the continuous latent (B, Cvae, H/d, W/d)."""
        return self.quant_conv(self.encoder(img_B3HW))

    def quantize_scales(self, latent: torch.Tensor, scales: Sequence[tuple[int, int]]) -> list:
        """Area-downsample the latent to every scale and quantise each independently."""
        return [self.quantize.indices(F.interpolate(latent, size=hw, mode="area")) for hw in scales]

    # ---------------------------------------------------------------- codes -> inputs
    def codewords(self, idx_Bl: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """(B, h*w) indices -> normalised codewords (B, Cvae, h, w)."""
        q = self.quantize.codebook()[idx_Bl]
        return rearrange(q, "b (h w) c -> b c h w", h=hw[0], w=hw[1])

    def upsampled_input(self, idx_Bl: torch.Tensor, hw: tuple[int, int], nxt: tuple[int, int]) -> torch.Tensor:
        """Input of the next scale: bicubic(codewords at hw -> nxt), flattened (B, nh*nw, Cvae)."""
        q = F.interpolate(self.codewords(idx_Bl, hw), size=nxt, mode="bicubic")
        return rearrange(q, "b c h w -> b (h w) c")

    # ---------------------------------------------------------------- decoding
    def decode_indices(self, idx_Bl: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """One scale's indices -> the raw (unclamped) decoder output (B, 3, d*h, d*w)."""
        return self.decoder(self.post_quant_conv(self.codewords(idx_Bl, hw)))


@torch.no_grad()
def init_tokenizer(model: VQModel, generator: torch.Generator | None = None) -> VQModel:
    """Upstream-style codebook init: uniform(-1/V, 1/V) rows (normalised at use anyway)."""
    v = model.vocab_size
    model.quantize.embedding.weight.uniform_(-1.0 / v, 1.0 / v, generator=generator)
    return model


def vq_training_loss(model: VQModel, img_B3HW: torch.Tensor, scales: Sequence[tuple[int, int]],
                     beta: float = 0.25) -> tuple[torch.Tensor, dict]:
    """Multi-scale VQ loss for fitting the tokenizer from scratch (LlamaGen terms).

    Per scale: quantise the area-downsampled latent, decode the straight-through codewords
    and compare with the image area-resized to that scale's pixel size (MSE), plus the
    codebook term |e - sg(z)|^2 and beta * the commitment term |sg(e) - z|^2 on the
    L2-normalised latent. Averaged over scales.
    """
    latent = model.encode_latent(img_B3HW)
    e_all = model.quantize.codebook()
    d = model.downsample
    recon = vq = commit = 0.0
    for hw in scales:
        z = F.normalize(F.interpolate(latent, size=hw, mode="area"), p=2, dim=1)
        idx = model.quantize.indices(z)
        e = rearrange(e_all[idx], "b (h w) c -> b c h w", h=hw[0], w=hw[1])
        vq = vq + (e - z.detach()).pow(2).mean()
        commit = commit + beta * (e.detach() - z).pow(2).mean()
        out = model.decoder(model.post_quant_conv(z + (e - z).detach()))
        target = F.interpolate(img_B3HW, size=(hw[0] * d, hw[1] * d), mode="area")
        recon = recon + F.mse_loss(out, target)
    n = len(scales)
    loss = (recon + vq + commit) / n
    stats = {k: float(v.detach()) / n for k, v in (("recon", recon), ("vq", vq), ("commit", commit))}
    return loss, stats
