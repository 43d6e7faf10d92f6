"""The VAR transformer (var.md §3) with upstream parameter and buffer names.

``forward(cond_B, x_BLCv_wo_first_l, schedule, student_forcing=False)`` accepts the full
``patch_nums`` schedule or any sub-sequence of its scales starting at the first one: each
scale picks its own rows of ``pos_1LC`` and its level id by matching its side against
``patch_nums``, and the block-causal mask comes from ``schedule.attention_bias()``.
``student_forcing=True`` is the official SAR short pass: the start token gets no
``pos_start``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from sar_adapters.common.adaln import AdaLNBeforeHead, AdaLNSelfAttn, SharedAdaLin
from sar_adapters.common.conditions import drop_labels
from sar_adapters.common.init import init_adaln_transformer
from sar_core.sar.prefix_cache import layer_slot
from sar_core.schedule import Schedule

from .config import VARConfig


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype autocast would compute a matmul in here (float32 without autocast)."""
    probe = like.new_ones(2, 2)
    return torch.matmul(probe, probe).dtype


class VAR(nn.Module):
    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, pn = cfg.embed_dim, tuple(cfg.patch_nums)
        self.C, self.Cvae, self.V = C, cfg.Cvae, cfg.vocab_size
        self.num_classes, self.patch_nums = cfg.num_classes, pn
        self.first_l, self.L = pn[0] ** 2, sum(p * p for p in pn)
        self.cond_drop_rate = float(cfg.cond_drop_rate)

        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(pn), C)

        if cfg.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C))
        else:
            self.shared_ada_lin = nn.Identity()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist() if cfg.depth else []
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(C, C, cfg.num_heads, cfg.mlp_ratio, dpr[i], cfg.norm_eps, cfg.shared_aln, cfg.attn_l2_norm)
            for i in range(cfg.depth)])
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)

        full = Schedule(pn)
        self.register_buffer("lvl_1L", full.scale_ids().view(1, self.L).contiguous())
        self.register_buffer("attn_bias_for_masking", full.attention_bias().contiguous())
        self._layout_cache: dict = {}

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                     init_head: float = 0.02, init_std: float = -1.0) -> None:
        """Upstream's recipe: truncated normals, small head, near-identity AdaLN gates."""
        std = math.sqrt(1 / self.C / 3) if init_std < 0 else init_std
        init_adaln_transformer(self, std, [(self.pos_start, std), (self.pos_1LC, std)],
                               init_head, init_adaln, init_adaln_gamma)

    # ----------------------------------------------------------------- schedules
    def levels_of(self, schedule: Schedule) -> list[int]:
        """Level (index into patch_nums) of every scale of ``schedule``."""
        if not schedule.is_square:
            raise ValueError(f"VAR schedules are square; got {schedule}")
        lv = []
        for side in schedule.sides:
            if side not in self.patch_nums:
                raise ValueError(f"scale {side} is not one of this model's patch_nums {list(self.patch_nums)}")
            lv.append(self.patch_nums.index(side))
        if lv[0] != 0:
            raise ValueError(f"a VAR schedule must start with the first scale {self.patch_nums[0]}; got {schedule}")
        if any(a >= b for a, b in zip(lv, lv[1:])):
            raise ValueError(f"schedule {schedule} is not an increasing sub-sequence of {list(self.patch_nums)}")
        return lv

    def layout(self, schedule: Schedule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level id per token (L,), pos_1LC row per token (L,), attention bias (1,1,L,L)); cached."""
        key = (schedule, str(device))
        if key not in self._layout_cache:
            offs = [0]
            for p in self.patch_nums:
                offs.append(offs[-1] + p * p)
            lv = self.levels_of(schedule)
            lvl = torch.cat([torch.full((self.patch_nums[i] ** 2,), i, dtype=torch.long) for i in lv])
            rows = torch.cat([torch.arange(offs[i], offs[i + 1]) for i in lv])
            bias = schedule.attention_bias()
            self._layout_cache[key] = (lvl.to(device), rows.to(device), bias.to(device))
        return self._layout_cache[key]

    def lvl_pos(self, schedule: Schedule) -> torch.Tensor:
        """lvl_embed + pos_1LC of every token of ``schedule``, (1, L, C)."""
        lvl, rows, _ = self.layout(schedule, self.pos_1LC.device)
        return self.lvl_embed(lvl).unsqueeze(0) + self.pos_1LC[:, rows]

    # ----------------------------------------------------------------- forward
    def drop_labels(self, label_B: torch.Tensor) -> torch.Tensor:
        """Class dropout to the null class with prob ``cond_drop_rate`` (train or eval)."""
        return drop_labels(label_B, self.cond_drop_rate, self.num_classes)

    def get_logits(self, h: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond_BD).float()).float()

    def forward(self, cond_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor,
                schedule: Optional[Schedule] = None, student_forcing: bool = False,
                prefix=None) -> torch.Tensor:
        """Teacher-forcing logits (B, L, V) float32 for ``schedule`` (default: patch_nums).

        ``prefix`` (:mod:`sar_core.sar.prefix_cache`): a record handle stores every layer's
        keys / values of the first ``length`` tokens; a replay handle takes inputs of the
        tokens from ``length`` on only and returns their logits (B, L - length, V)."""
        schedule = Schedule(self.patch_nums) if schedule is None else Schedule.parse(schedule)
        B, dev = x_BLCv_wo_first_l.shape[0], x_BLCv_wo_first_l.device
        lvl, rows, bias = self.layout(schedule, dev)
        L = lvl.shape[0]
        start = prefix.cache.length if prefix is not None and prefix.replay else 0
        if x_BLCv_wo_first_l.shape[1] != L - max(start, self.first_l):
            raise ValueError(f"inputs hold {x_BLCv_wo_first_l.shape[1]} tokens; schedule {schedule} "
                             f"needs {L - max(start, self.first_l)} (L - first_len)")
        if cond_B.shape[0] != B:
            raise ValueError(f"{cond_B.shape[0]} conditions for a batch of {B} inputs")
        with _no_autocast(dev):
            label_B = self._labels(cond_B, prefix)
            cond_BD = self.class_emb(label_B)
            words = self.word_embed(x_BLCv_wo_first_l.float())
            if start == 0:
                sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1)
                if not student_forcing:
                    sos = sos + self.pos_start.expand(B, self.first_l, -1)
                words = torch.cat((sos, words), dim=1)
            x_BLC = words + (self.lvl_embed(lvl[start:]).unsqueeze(0) + self.pos_1LC[:, rows[start:]])
        cond_gss = self.shared_ada_lin(cond_BD)
        dtype = compute_dtype(x_BLC)
        x_BLC, cond_gss, bias = x_BLC.to(dtype), cond_gss.to(dtype), bias[..., start:, :].to(dtype)
        for i, block in enumerate(self.blocks):
            x_BLC = block(x_BLC, cond_gss, bias, layer_slot(prefix, i))
        return self.get_logits(x_BLC, cond_BD)

    def _labels(self, cond_B: torch.Tensor, prefix) -> torch.Tensor:
        """Class ids after dropout; a prefix replay reuses the recorded pass's draw."""
        if prefix is not None and prefix.replay:
            return prefix.cache.state["labels"]
        label_B = self.drop_labels(cond_B.long())
        if prefix is not None:
            prefix.cache.state["labels"] = label_B
        return label_B

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cached layouts
        self._layout_cache = {}
        return super()._apply(fn, recurse)
