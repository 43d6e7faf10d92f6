"""Infinity sizes, schedules and training options, as users write them (pydantic).

Every size is inferred from the checkpoints (see ``checkpoint.infer_*``). The schedule is
the template nearest ``h_div_w`` cut to ``pn`` (spec §2.1); an explicit ``schedule``
(list of (h, w) or (1, h, w)) must be a template prefix. Official Infinity-2B:
d 32 tokenizer (base_ch 128, ch_mult 1,2,4,4,4, stride 16), depth 32, width 2048,
16 heads, 8 block chunks, T5 width 2048, text_maxlen 512.

Bitwise Self-Correction (``bsc_layers`` > 0) flips bits of the first ``bsc_layers``
scales with a per-scale rate drawn from {0, 0.01, ..., bsc_strength} and re-quantises
the later scales against the corrupted history (upstream train.sh: 13, 0.3, requant on).
"""

from __future__ import annotations

import math
from typing import Optional

from pydantic import BaseModel, model_validator

from sar_core.adapter import AdapterConfig
from sar_core.schedule import Schedule

from .templates import check_pn, schedule_template, template_schedule


def ffn_width(embed_dim: int, mlp_ratio: float = 4.0) -> int:
    """round(C * ratio / 256) * 256 with Python's half-to-even round (spec §11.1)."""
    return int(round(embed_dim * mlp_ratio / 256) * 256)


class TokenizerConfig(BaseModel):
    model_config = {"extra": "forbid"}

    codebook_dim: int = 32
    base_ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    patch_size: int = 16

    @property
    def num_down(self) -> int:
        return int(round(math.log2(self.patch_size)))

    @model_validator(mode="after")
    def _check(self) -> "TokenizerConfig":
        if self.patch_size < 1 or 2 ** self.num_down != self.patch_size:
            raise ValueError(f"tokenizer patch_size must be a power of 2, got {self.patch_size}")
        if self.num_down > len(self.ch_mult):
            raise ValueError(f"patch_size {self.patch_size} needs >= {self.num_down} ch_mult levels, "
                             f"got {list(self.ch_mult)}")
        for c in [self.base_ch * m for m in self.ch_mult]:
            if c % 32 and c % 24:
                raise ValueError(f"tokenizer channel count {c} is neither a multiple of 32 nor 24")
        return self


# Validation shapes repeat FlexVAR's (divisibility, cond_drop_rate range): the fields differ per
# upstream and so do the messages, so each family keeps its own validator.
class BackboneConfig(BaseModel):
    model_config = {"extra": "forbid"}

    depth: int = 32
    embed_dim: int = 2048
    num_heads: int = 16
    block_chunks: int = 8
    mlp_hidden: Optional[int] = None   # round(4C/256)*256
    text_channels: int = 2048
    text_maxlen: int = 512
    text_pool_heads: Optional[int] = None  # Ct5 / 128 (Ct5 / 64 if C > 4096)
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    top_k: int = 0                     # the model's own default for top_k = 0 calls

    @model_validator(mode="after")
    def _derive(self) -> "BackboneConfig":
        if self.mlp_hidden is None:
            self.mlp_hidden = ffn_width(self.embed_dim)
        if self.mlp_hidden < 1:
            raise ValueError(f"the default FFN width round(4 * {self.embed_dim} / 256) * 256 is 0 for so "
                             "narrow a model; set backbone.mlp_hidden")
        if self.text_pool_heads is None:
            self.text_pool_heads = self.text_channels // (64 if self.embed_dim > 4096 else 128) or 1
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a head "
                             "width divisible by 4 (2-D RoPE)")
        if self.embed_dim % self.text_pool_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by text_pool_heads {self.text_pool_heads}")
        if self.block_chunks < 1 or self.depth % self.block_chunks:
            raise ValueError(f"depth {self.depth} is not divisible by block_chunks {self.block_chunks}")
        if not 0 <= self.cond_drop_rate <= 1:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        return self


class InfinityConfig(AdapterConfig):
    tokenizer: TokenizerConfig = TokenizerConfig()
    backbone: BackboneConfig = BackboneConfig()
    pn: str = "0.06M"
    h_div_w: float = 1.0
    schedule: Optional[list] = None    # explicit template prefix; overrides pn / h_div_w
    bsc_layers: int = 0                # Bitwise Self-Correction off by default
    bsc_strength: float = 0.3
    bsc_requant: bool = True
    cfg_insertion_layer: int = 0       # 0: guidance on logits (shipped); -n: hidden state after block depth-n
    spatial_patchify: bool = False     # Infinity-8B: the tokenizer grid is 2x the transformer's
    tau: float = 1.0                   # sampling temperature; divides guided logits (upstream scripts: 0.5 for 2B)
    # class-conditional stand-in for text (miniatures, studies): class c -> a fixed pseudo-prompt
    stand_in_classes: int = 0          # 0: off (text features required)
    stand_in_tokens: int = 2           # feature rows per pseudo-prompt

    @model_validator(mode="after")
    def _check(self) -> "InfinityConfig":
        check_pn(self.pn)
        if self.h_div_w <= 0:
            raise ValueError(f"h_div_w must be > 0, got {self.h_div_w}")
        if self.schedule is not None:
            schedule_template(Schedule(self.schedule), self.h_div_w)
        if self.stand_in_classes < 0 or self.stand_in_tokens < 1:
            raise ValueError("stand_in_classes must be >= 0 and stand_in_tokens >= 1")
        if self.stand_in_tokens > self.backbone.text_maxlen:
            raise ValueError(f"stand_in_tokens {self.stand_in_tokens} exceeds text_maxlen {self.backbone.text_maxlen}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.bsc_layers < 0 or not 0 <= self.bsc_strength <= 1:
            raise ValueError("bsc_layers must be >= 0 and bsc_strength in [0, 1]")
        if self.cfg_insertion_layer > 1 or -self.cfg_insertion_layer > self.backbone.depth:
            raise ValueError(f"cfg_insertion_layer must be 0, 1 or -n with n <= depth, got {self.cfg_insertion_layer}")
        return self

    @property
    def patch_factor(self) -> int:
        return 2 if self.spatial_patchify else 1

    @property
    def token_bits(self) -> int:
        """Bits per transformer token: d, or 4d with spatial patchify."""
        return self.tokenizer.codebook_dim * self.patch_factor ** 2

    @property
    def train_schedule(self) -> Schedule:
        if self.schedule is not None:
            return Schedule(self.schedule)
        return template_schedule(self.h_div_w, self.pn)
