"""VAR's multi-scale residual VQVAE (var.md §2), with upstream state-dict key names.

Images (B, 3, H, W) in [-1, 1] -> latent f (B, Cvae, h, w) -> one index map per scale.
Scale s quantises the area-downsampled residual, its codewords are bicubic-upsampled to
(h, w) (the last scale is not resized), passed through phi_k(s) and accumulated into f_hat.
The phi index follows upstream's tick rule (``phi_index``), computed, never tabulated.

All tokenizer maths runs in float32 with autocast off (the tokenizer is frozen).
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import VARConfig


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------ conv blocks
def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention, softmax scale c^-0.5, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b (h w) c", three=3)
        w_BNN = torch.bmm(q, k.transpose(1, 2)).mul_(C ** -0.5).softmax(dim=-1)
        h = rearrange(torch.bmm(w_BNN, v), "b (h w) c -> b c h w", h=H, w=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _mid(c: int, using_mid_sa: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(c, c)
    mid.attn_1 = AttnBlock(c) if using_mid_sa else nn.Identity()
    mid.block_2 = ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        ch, mult, R = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        c_in = ch
        for i in range(R):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c_in, ch * mult[i]))
                c_in = ch * mult[i]
                if i == R - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(c_in))
            if i != R - 1:
                level.downsample = Downsample(c_in)
            self.down.append(level)
        self.mid = _mid(c_in, cfg.using_mid_sa)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.Cvae, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        ch, mult, R = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.Cvae, c_in, 3, 1, 1)
        self.mid = _mid(c_in, cfg.using_mid_sa)
        levels = []
        for i in reversed(range(R)):  # built coarse to fine, stored fine to coarse (up.0 = full res)
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c_in, ch * mult[i]))
                c_in = ch * mult[i]
                if i == R - 1 and cfg.using_sa:
                    level.attn.append(AttnBlock(c_in))
            if i != 0:
                level.upsample = Upsample(c_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------ quantizer
class Phi(nn.Conv2d):
    """phi(h) = (1 - r) h + r conv3x3(h)."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


def phi_ticks(K: int) -> np.ndarray:
    """Upstream's tick positions of K phi convolutions on [0, 1] (float64)."""
    if K == 4:
        return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K)
    return np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_index(si: int, SN: int, K: int) -> int:
    """Which of K phi convs scale si of SN uses: the tick nearest to si/(SN-1), first on ties."""
    if K <= 1:
        return 0
    at = si / (SN - 1) if SN > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(K) - at)))


class QuantResi(nn.Module):
    """Holds the phi convs under upstream's key layout for each sharing mode."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.K = cfg.num_phi
        self.mode = "identity" if self.K == 0 else ("shared" if cfg.share_quant_resi == 1 else
                                                   "non_shared" if cfg.share_quant_resi == 0 else "partial")
        convs = [Phi(cfg.Cvae, cfg.quant_resi) for _ in range(self.K)]
        if self.mode == "shared":
            self.qresi = convs[0]
        elif self.mode == "partial":
            self.qresi_ls = nn.ModuleList(convs)
        elif self.mode == "non_shared":
            for i, conv in enumerate(convs):
                self.add_module(str(i), conv)

    def conv(self, si: int, SN: int) -> nn.Module:
        if self.mode == "identity":
            return nn.Identity()
        if self.mode == "shared":
            return self.qresi
        k = phi_index(si, SN, self.K)
        return self.qresi_ls[k] if self.mode == "partial" else getattr(self, str(k))


class Quantizer(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.vocab_size, self.Cvae, self.using_znorm = cfg.vocab_size, cfg.Cvae, cfg.using_znorm
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.Cvae)
        self.quant_resi = QuantResi(cfg)
        # training statistics only; kept so upstream's strict load of a saved file works
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword of each row (Euclidean, or cosine with znorm)."""
        e_VC = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(e_VC.T, dim=0), dim=1)
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)
        d_NV.addmm_(z_NC, e_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def codes_to_map(self, idx_Bl: torch.Tensor, side: int) -> torch.Tensor:
        """(B, side*side) indices -> (B, Cvae, side, side) codewords."""
        return rearrange(self.embedding(idx_Bl), "b (h w) c -> b c h w", h=side, w=side)

    def lift(self, h_BCpp: torch.Tensor, si: int, sides: Sequence[int]) -> torch.Tensor:
        """phi_k(si)(bicubic-upsample to the latent side), no resize at the last scale."""
        H = sides[-1]
        if si != len(sides) - 1:
            h_BCpp = F.interpolate(h_BCpp, size=(H, H), mode="bicubic")
        return self.quant_resi.conv(si, len(sides))(h_BCpp.contiguous())


# ------------------------------------------------------------------------ VQVAE
class VQVAE(nn.Module):
    """Upstream ``VQVAE`` layout: encoder, decoder, quant_conv, post_quant_conv, quantize."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        ks = cfg.quant_conv_ks
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.Cvae, cfg.Cvae, ks, 1, ks // 2)

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    # -- image -> latent -> codes
    def encode_f(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> f (B, Cvae, H/ds, W/ds)."""
        with _no_autocast(images.device):
            return self.quant_conv(self.encoder(images.float()))

    def quantize_f(self, f: torch.Tensor, sides: Sequence[int]) -> tuple[list, list]:
        """Residual quantisation of f over ``sides`` -> (indices per scale, f_hat after each)."""
        B, C, H, W = f.shape
        if sides[-1] != H or H != W:
            raise ValueError(f"the last scale side {sides[-1]} must equal the latent side {H}x{W} "
                             f"(images of {H * self.downsample} px for this tokenizer)")
        q, SN = self.quantize, len(sides)
        with _no_autocast(f.device):
            f_rest = f.detach().float().clone()
            f_hat = torch.zeros_like(f_rest)
            idx_list, fhat_list = [], []
            for si, pn in enumerate(sides):
                z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
                idx_N = q.nearest(rearrange(z, "b c h w -> (b h w) c"))
                idx_Bl = idx_N.view(B, pn * pn)
                h = q.lift(q.codes_to_map(idx_Bl, pn), si, sides)
                f_hat.add_(h)
                f_rest.sub_(h)
                idx_list.append(idx_Bl)
                fhat_list.append(f_hat.clone())
        return idx_list, fhat_list

    def encode(self, images: torch.Tensor, sides: Sequence[int]) -> list:
        return self.quantize_f(self.encode_f(images), sides)[0]

    # -- codes -> transformer inputs
    def _terms(self, codes: Sequence[Optional[torch.Tensor]], sides: Sequence[int], upto: int) -> list:
        q = self.quantize
        return [q.lift(q.codes_to_map(codes[si], sides[si]), si, sides) for si in range(upto)]

    @staticmethod
    def _area_tokens(f_hat: torch.Tensor, side: int) -> torch.Tensor:
        return rearrange(F.interpolate(f_hat, size=(side, side), mode="area"), "b c h w -> b (h w) c")

    def teacher_inputs(self, codes: Sequence[torch.Tensor], sides: Sequence[int]) -> torch.Tensor:
        """x_BLCv_wo_first_l: area(cumulative f_hat after scale s) at side s+1, for s < SN-1."""
        B, SN, H = codes[0].shape[0], len(sides), sides[-1]
        dev = codes[0].device
        with _no_autocast(dev):
            f_hat = torch.zeros(B, self.cfg.Cvae, H, H, device=dev)
            nxt = []
            for si, term in enumerate(self._terms(codes, sides, SN - 1)):
                f_hat.add_(term)
                nxt.append(self._area_tokens(f_hat, sides[si + 1]))
        if not nxt:
            return torch.zeros(B, 0, self.cfg.Cvae, device=dev)
        return torch.cat(nxt, dim=1)

    def stagger_inputs(self, gt_codes: Sequence[torch.Tensor], pred_codes: Sequence[Optional[torch.Tensor]],
                       sides: Sequence[int], scales: Sequence[int]) -> torch.Tensor:
        """Teacher inputs, except that for each k in ``scales`` the input of scale k+1 is
        area(sum_{j<k} phi_j(up(gt_j)) + phi_k(up(pred_k))): what the sampler feeds after
        predicting scale k on top of ground truth below k. Equals ``teacher_inputs`` when
        pred == gt."""
        SN = len(sides)
        ks = sorted(set(int(k) for k in scales))
        for k in ks:
            if not 0 <= k <= SN - 2:
                raise ValueError(f"stagger scale {k} out of range 0..{SN - 2} (it feeds scale k+1)")
            if pred_codes[k] is None:
                raise ValueError(f"stagger scale {k} chosen but pred_codes[{k}] is None")
        B, H, dev = gt_codes[0].shape[0], sides[-1], gt_codes[0].device
        with _no_autocast(dev):
            f_hat = torch.zeros(B, self.cfg.Cvae, H, H, device=dev)
            nxt = []
            q = self.quantize
            for si, term in enumerate(self._terms(gt_codes, sides, SN - 1)):
                if si in ks:
                    pred = q.lift(q.codes_to_map(pred_codes[si], sides[si]), si, sides)
                    nxt.append(self._area_tokens(f_hat.clone().add_(pred), sides[si + 1]))
                    f_hat.add_(term)
                else:
                    f_hat.add_(term)
                    nxt.append(self._area_tokens(f_hat, sides[si + 1]))
        if not nxt:
            return torch.zeros(B, 0, self.cfg.Cvae, device=dev)
        return torch.cat(nxt, dim=1)

    # -- sampler step and decoding
    def next_input(self, f_hat: torch.Tensor, h_BCpp: torch.Tensor, si: int,
                   sides: Sequence[int]) -> Optional[torch.Tensor]:
        """Accumulate scale si into f_hat (in place); return the next scale's tokens or None."""
        f_hat.add_(self.quantize.lift(h_BCpp.float(), si, sides))
        if si == len(sides) - 1:
            return None
        return self._area_tokens(f_hat, sides[si + 1])

    def codes_to_fhat(self, codes: Sequence[torch.Tensor], sides: Sequence[int]) -> torch.Tensor:
        B, H, dev = codes[0].shape[0], sides[-1], codes[0].device
        with _no_autocast(dev):
            f_hat = torch.zeros(B, self.cfg.Cvae, H, H, device=dev)
            for term in self._terms(codes, sides, len(sides)):
                f_hat.add_(term)
        return f_hat

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat -> image in [-1, 1] (clamped)."""
        with _no_autocast(f_hat.device):
            return self.decoder(self.post_quant_conv(f_hat.float())).clamp_(-1, 1)

    def decode(self, codes: Sequence[torch.Tensor], sides: Sequence[int]) -> torch.Tensor:
        return self.fhat_to_img(self.codes_to_fhat(codes, sides))

    # -- training from scratch (sar pretrain)
    def training_loss(self, images: torch.Tensor, sides: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """Upstream's VQ objective: per-scale codebook + beta * commitment MSE on f_hat,
        straight-through f_hat into the decoder, plus an L1 + MSE reconstruction term."""
        f = self.quant_conv(self.encoder(images.float()))
        B, C, H, W = f.shape
        q, SN = self.quantize, len(sides)
        f_ng = f.detach()
        f_rest, f_hat = f_ng.clone(), torch.zeros_like(f_ng)
        vq = f.new_zeros(())
        for si, pn in enumerate(sides):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != SN - 1 else f_rest
            idx_Bl = q.nearest(rearrange(z, "b c h w -> (b h w) c")).view(B, pn * pn)
            h = q.lift(q.codes_to_map(idx_Bl, pn), si, sides)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            vq = vq + F.mse_loss(f_hat.detach(), f).mul(self.cfg.beta) + F.mse_loss(f_hat, f_ng)
        vq = vq / SN
        st = (f_hat.detach() - f_ng) + f
        rec = self.decoder(self.post_quant_conv(st))
        l1, l2 = F.l1_loss(rec, images), F.mse_loss(rec, images)
        loss = l1 + l2 + vq
        return loss, {"rec_l1": l1.item(), "rec_mse": l2.item(), "vq": vq.item()}
