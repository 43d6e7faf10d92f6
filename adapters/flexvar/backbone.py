"""The FlexVAR transformer: VAR's AdaLN blocks with a 2-D position grid, any schedule.

Parameter names match the upstream state dict: ``word_embed``, ``class_emb``,
``pos_start`` (1, 1, C), ``pos_1LC`` (1, C, G, G), ``blocks.*``, ``head_nm.*``, ``head.*``
(plus ``shared_ada_lin.1.*`` with a shared AdaLN) and the buffer
``attn_bias_for_masking``, kept only so saved files load strictly upstream: the mask of
every call is rebuilt from the call's schedule.

Positions of a scale of side (h, w) are the area-downsampled grid; there is no level
embedding. The start token is class embedding + ``pos_start`` + the 1x1 position.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sar_adapters.common.adaln import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin, set_kv_caching
from sar_adapters.common.conditions import drop_labels
from sar_adapters.common.init import init_adaln_transformer
from sar_core.sar.prefix_cache import layer_slot
from sar_core.schedule import Schedule

from .config import BackboneConfig, OFFICIAL_PATCH_NUMS


def sincos_grid(side: int, dim: int) -> torch.Tensor:
    """Upstream's initial grid (1, C, G, G): even channels sin(row*w), odd cos(col*w)."""
    omega = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    coords = torch.arange(side, dtype=torch.float32)
    grid = torch.zeros(side, side, dim)
    grid[:, :, 0::2] = torch.sin(coords[:, None, None] * omega)
    grid[:, :, 1::2] = torch.cos(coords[None, :, None] * omega)
    return rearrange(grid, "h w c -> 1 c h w")


def _autocast_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


class FlexVAR(nn.Module):
    def __init__(self, cfg: BackboneConfig, vocab_size: int, cvae: int,
                 patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS):
        super().__init__()
        C, depth = cfg.embed_dim, cfg.depth
        self.cfg = cfg
        self.C, self.V, self.Cvae = C, vocab_size, cvae
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = float(cfg.cond_drop_rate)
        self.word_embed = nn.Linear(cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_1LC = nn.Parameter(sincos_grid(cfg.pos_grid, C))
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C))
                               if cfg.shared_aln else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, C, cfg.num_heads, cfg.mlp_ratio, dpr[i], cfg.norm_eps,
                          cfg.shared_aln, cfg.attn_l2_norm) for i in range(depth)])
        self.register_buffer("attn_bias_for_masking", Schedule(patch_nums).attention_bias())
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self._masks: dict = {}

    # ---------------------------------------------------------------- pieces
    def positions(self, schedule: Schedule) -> torch.Tensor:
        """(1, L, C): the area-downsampled grid of every scale, concatenated."""
        return torch.cat([rearrange(F.interpolate(self.pos_1LC, size=hw, mode="area"),
                                    "1 c h w -> 1 (h w) c") for hw in schedule], dim=1)

    def mask(self, schedule: Schedule, device: torch.device) -> torch.Tensor:
        key = (schedule, str(device))
        if key not in self._masks:
            if len(self._masks) > 64:
                self._masks.clear()
            self._masks[key] = schedule.attention_bias(device)
        return self._masks[key]

    def drop_labels(self, label_B: torch.Tensor) -> torch.Tensor:
        return drop_labels(label_B, self.cond_drop_rate, self.num_classes)

    def null_labels(self, label_B: torch.Tensor) -> torch.Tensor:
        return torch.full_like(label_B, self.num_classes)

    def logits(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """Head on hidden states; no float32 cast (upstream FlexVAR keeps the AMP dtype)."""
        return self.head(self.head_nm(x_BLC, cond_BD))

    def run_blocks(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor,
                   attn_bias: Optional[torch.Tensor], prefix=None) -> torch.Tensor:
        ada = self.shared_ada_lin(cond_BD)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, ada, attn_bias, layer_slot(prefix, i))
        return x_BLC

    def kv_caching(self, enable: bool) -> None:
        set_kv_caching(self.blocks, enable)

    # ---------------------------------------------------------------- forward
    def forward(self, cond_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, schedule,
                student_forcing: bool = False, prefix=None) -> torch.Tensor:
        """Teacher-forcing logits (B, L, V) over ``schedule``.

        ``student_forcing=True`` is the official SAR short pass: the first token is the
        class embedding alone (no ``pos_start``); with schedule [1, n] it returns logits
        for the class token and the n*n student tokens. ``prefix``
        (:mod:`sar_core.sar.prefix_cache`): a record handle stores every layer's keys / values
        of the first ``length`` tokens; a replay handle takes inputs of the tokens from
        ``length`` on only and returns their logits (B, L - length, V).
        """
        schedule = Schedule.parse(schedule)
        if schedule.first_len != 1:
            raise ValueError(f"FlexVAR schedules start with a 1x1 scale, got {schedule}")
        B = x_BLCv_wo_first_l.shape[0]
        start = prefix.cache.length if prefix is not None and prefix.replay else 0
        want = schedule.total_tokens - max(start, 1)
        if x_BLCv_wo_first_l.shape[1] != want:
            raise ValueError(f"inputs have {x_BLCv_wo_first_l.shape[1]} tokens; schedule {schedule} "
                             f"needs {want} (L - 1)")
        dev = x_BLCv_wo_first_l.device
        main_type = _autocast_dtype(dev, self.pos_1LC.dtype)
        with torch.autocast(dev.type, enabled=False):
            cond_BD = self.class_emb(self._labels(cond_B, prefix))
            words = self.word_embed(x_BLCv_wo_first_l.to(cond_BD.dtype))
            if start == 0:
                first = cond_BD.unsqueeze(1)
                if not student_forcing:
                    first = first + self.pos_start
                words = torch.cat((first, words), dim=1)
            x_BLC = words + self.positions(schedule)[:, start:]
        attn_bias = self.mask(schedule, dev)[..., start:, :].to(main_type)
        x_BLC = self.run_blocks(x_BLC.to(main_type), cond_BD.to(main_type), attn_bias, prefix)
        return self.logits(x_BLC, cond_BD)

    def _labels(self, cond_B: torch.Tensor, prefix) -> torch.Tensor:
        """Class ids after dropout; a prefix replay reuses the recorded pass's draw."""
        if prefix is not None and prefix.replay:
            return prefix.cache.state["labels"]
        label_B = self.drop_labels(cond_B)
        if prefix is not None:
            prefix.cache.state["labels"] = label_B
        return label_B


@torch.no_grad()
def init_weights(model: FlexVAR, init_std: float = 0.02, init_head: float = 0.02,
                 init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> FlexVAR:
    """Random init in the spirit of upstream ``init_weights`` (truncated normals, small
    head and AdaLN gains, residual projections scaled by 1/sqrt(2 * depth))."""
    init_adaln_transformer(model, init_std, [(model.pos_start, math.sqrt(1 / model.C / 3))],
                           init_head, init_adaln, init_adaln_gamma)
    return model
