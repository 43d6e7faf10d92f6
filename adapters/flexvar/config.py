"""FlexVAR sizes and schedules, as users write them (pydantic).

Every size can be inferred from the checkpoints (``infer_flexvar_config``); fields
left at ``None`` are derived from the others the way the official scripts do
(width 64 * depth, heads = depth, drop path 0.1 * depth / 24).

``image_size`` is the training / data resolution in pixels. It bounds the default scale
schedule: the official list (1, 2, 3, 4, 5, 6, 8, 10, 13, 16) truncated to sides that fit
the latent grid (``image_size / downsample``) and the position grid. Left unset, the
latent is taken as 16 tokens a side, i.e. the full official list.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, model_validator

from sar_adapters.common.overrides import merge_overrides
from sar_core.adapter import AdapterConfig, CheckpointError
from sar_core.schedule import Schedule

OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
DEFAULT_LATENT_SIDE = 16


class TokenizerConfig(BaseModel):
    """LlamaGen VQModel (FlexVAE) sizes. Official: 8912 x 32 codebook, ch 128, 16x."""

    model_config = {"extra": "forbid"}

    codebook_size: int = 8912
    codebook_embed_dim: int = 32
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        for c in [self.ch * m for m in self.ch_mult] + [self.z_channels]:
            if c % 32:
                raise ValueError(f"tokenizer channel count {c} is not a multiple of 32 (GroupNorm(32))")
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError("tokenizer needs a non-empty ch_mult and num_res_blocks >= 1")
        return self


# The transformer fields repeat VAR's (adapters/var/config.py) on purpose: each mirrors its own
# upstream's hyperparameters (FlexVAR derives width / heads / drop-path from depth, adds its
# position grid), and the two upstreams evolve apart; a shared base would couple them.
class BackboneConfig(BaseModel):
    """FlexVAR transformer sizes. Official d16: width 1024, 16 heads, 1000 classes."""

    model_config = {"extra": "forbid"}

    depth: int = 16
    embed_dim: Optional[int] = None        # 64 * depth
    num_heads: Optional[int] = None        # depth
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    drop_path_rate: Optional[float] = None  # 0.1 * depth / 24
    pos_grid: int = 32                     # side of the learnable (1, C, G, G) position grid

    @model_validator(mode="after")
    def _derive(self) -> "BackboneConfig":
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not 0 <= self.cond_drop_rate <= 1:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        return self


class FlexVARConfig(AdapterConfig):
    tokenizer: TokenizerConfig = TokenizerConfig()
    backbone: BackboneConfig = BackboneConfig()
    train_patch_nums: Optional[tuple[int, ...]] = None
    infer_patch_nums: Optional[tuple[int, ...]] = None
    image_size: Optional[int] = None       # training crop / data resolution in pixels
    random_schedule: bool = False          # upstream's random per-step schedule (needs latent >= 16)

    @property
    def latent_side(self) -> int:
        if self.image_size is None:
            return DEFAULT_LATENT_SIDE
        return self.image_size // self.tokenizer.downsample

    @property
    def train_schedule(self) -> Schedule:
        if self.train_patch_nums is not None:
            return Schedule(self.train_patch_nums)
        limit = min(self.latent_side, self.backbone.pos_grid)
        return Schedule([p for p in OFFICIAL_PATCH_NUMS if p <= limit])

    @property
    def infer_schedule(self) -> Schedule:
        if self.infer_patch_nums is not None:
            return Schedule(self.infer_patch_nums)
        return self.train_schedule

    @model_validator(mode="after")
    def _check(self) -> "FlexVARConfig":
        down = self.tokenizer.downsample
        if self.image_size is not None and (self.image_size <= 0 or self.image_size % down):
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of the "
                             f"tokenizer's downsampling factor {down}")
        for name in ("train_patch_nums", "infer_patch_nums"):
            sides = getattr(self, name)
            if sides is not None:
                check_sides(sides, self.backbone.pos_grid, name)
        if self.train_patch_nums is None and self.latent_side < 1:
            raise ValueError(f"image_size {self.image_size} is smaller than one token")
        return self


def check_sides(sides, pos_grid: int, what: str = "schedule") -> None:
    """FlexVAR schedules start at a 1x1 scale and fit the position grid."""
    sides = list(sides)
    if not sides or sides[0] != 1:
        raise ValueError(f"{what} must start with a 1x1 scale (the class token), got {sides}")
    if max(sides) > pos_grid:
        raise ValueError(f"{what} {sides} has a side above the position grid ({pos_grid})")


# ------------------------------------------------------------------ inference from state dicts
def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def infer_tokenizer(sd: dict) -> dict:
    emb = sd["quantize.embedding.weight"]
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(sd, r"encoder\.conv_blocks\.(\d+)\.")
    mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(levels)
                 if f"encoder.conv_blocks.{i}.res.0.conv1.weight" in sd)
    out = {"codebook_size": emb.shape[0], "codebook_embed_dim": emb.shape[1], "ch": ch,
           "num_res_blocks": _count(sd, r"encoder\.conv_blocks\.0\.res\.(\d+)\.")}
    if "encoder.conv_out.weight" in sd:
        out["z_channels"] = sd["encoder.conv_out.weight"].shape[0]
    if mult:
        out["ch_mult"] = mult
    return out


def infer_backbone(sd: dict) -> dict:
    C, cvae = sd["word_embed.weight"].shape
    out = {"embed_dim": C, "num_classes": sd["class_emb.weight"].shape[0] - 1,
           "depth": _count(sd, r"blocks\.(\d+)\."), "pos_grid": sd["pos_1LC"].shape[-1]}
    scale_mul = sd.get("blocks.0.attn.scale_mul_1H11")
    out["attn_l2_norm"] = scale_mul is not None
    if scale_mul is not None:
        out["num_heads"] = scale_mul.shape[1]
    if "blocks.0.ffn.fc1.weight" in sd:
        out["mlp_ratio"] = sd["blocks.0.ffn.fc1.weight"].shape[0] / C
    out["shared_aln"] = "shared_ada_lin.1.weight" in sd or "blocks.0.ada_gss" in sd
    if not out["attn_l2_norm"] and "num_heads" not in out:
        out["num_heads"] = max(1, C // 64)
    return out


def backbone_io_sizes(sd: dict) -> tuple[int, int]:
    """(vocab, Cvae) the transformer was trained with."""
    return sd["head.weight"].shape[0], sd["word_embed.weight"].shape[1]


def apply_overrides(cfg: dict, overrides: Optional[dict]) -> dict:
    """Merge overrides into a {'tokenizer': {...}, 'backbone': {...}, ...} dict.

    Keys may be nested dicts, dotted (``backbone.depth``) or bare field names of one
    sub-config (``depth``, ``ch_mult``, ``cond_drop_rate``)."""
    return merge_overrides(cfg, overrides, {"tokenizer": TokenizerConfig, "backbone": BackboneConfig})


def infer_flexvar_config(tokenizer_sd: dict, backbone_sd: Optional[dict], overrides: Optional[dict] = None,
                         source: str = "the checkpoints") -> "FlexVARConfig":
    """The config the state dicts imply; ``overrides`` win. Mismatches raise CheckpointError."""
    raw = {"tokenizer": infer_tokenizer(tokenizer_sd)}
    if backbone_sd is not None:
        raw["backbone"] = infer_backbone(backbone_sd)
    try:
        config = FlexVARConfig(**apply_overrides(raw, overrides))
    except ValueError as exc:
        raise CheckpointError(f"invalid FlexVAR configuration from {source}: {exc}") from exc
    if backbone_sd is not None:
        vocab, cvae = backbone_io_sizes(backbone_sd)
        tcfg = config.tokenizer
        if (vocab, cvae) != (tcfg.codebook_size, tcfg.codebook_embed_dim):
            raise CheckpointError(
                f"{source}: the backbone predicts {vocab} codes of dim {cvae}, but the tokenizer has a "
                f"{tcfg.codebook_size} x {tcfg.codebook_embed_dim} codebook")
    return config
