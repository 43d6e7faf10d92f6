"""VARAdapter: FoundationVision/VAR (class-conditional, residual multi-scale VQVAE)."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch

from sar_core.adapter import CodeSpace, Codes, Generation, ScaleWiseAdapter
from sar_core.checkpoint_io import NoBackbone, params_on_meta
from sar_core.schedule import Schedule

from sar_adapters.common.init import NO_DECAY_KEYWORDS

from sar_adapters.common.classes import resize_class_embedding
from . import checkpoint as ckpt
from .backbone import VAR
from .case import VARCaseRunner
from .config import VARConfig, infer_var_config, make_config
from .sampler import generate as var_generate
from .tokenizer import VQVAE

class VARAdapter(ScaleWiseAdapter):
    name = "var"
    reuses_prefix = True  # backbone forward takes prefix= (sar_core.sar.prefix_cache)
    prefix_stable = True  # positions per scale, block-causal: a schedule's head is its own pass
    config_cls = VARConfig
    no_decay_keywords = NO_DECAY_KEYWORDS
    case_runner = VARCaseRunner

    config: VARConfig
    tokenizer: VQVAE
    backbone: VAR

    def __init__(self, config: VARConfig, tokenizer: VQVAE, backbone: VAR, layout: str = "plain"):
        super().__init__(config, tokenizer, backbone)
        self.layout = layout

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: VARConfig | dict) -> "VARAdapter":
        cfg = config if isinstance(config, VARConfig) else make_config(dict(config))
        backbone = VAR(cfg)
        backbone.init_weights()
        return cls(cfg, VQVAE(cfg), backbone)

    @classmethod
    def load(cls, tokenizer_path: str | Path | None, backbone_path: str | Path | None,
             overrides: dict | None = None) -> "VARAdapter":
        return cls._load(tokenizer_path, backbone_path, overrides, with_backbone=True)

    @classmethod
    def load_tokenizer(cls, tokenizer_path: str | Path, overrides: dict | None = None) -> "VARAdapter":
        return cls._load(tokenizer_path, None, overrides, with_backbone=False)

    @classmethod
    def _load(cls, tokenizer_path, backbone_path, overrides, with_backbone: bool) -> "VARAdapter":
        tok_sd = bb_sd = None
        layout = "plain"
        if tokenizer_path is not None:
            tok_sd = ckpt.read_tokenizer(tokenizer_path)
        if backbone_path is not None:
            bb_sd, layout = ckpt.read_backbone(backbone_path)
        cfg = infer_var_config(tok_sd, bb_sd, overrides)
        # parameters that a file fills are built without memory and become the file's tensors
        with params_on_meta() if tok_sd is not None else nullcontext():
            tokenizer = VQVAE(cfg)
        if tok_sd is not None:
            ckpt.load_into(tokenizer, tok_sd, cfg, "tokenizer", tokenizer_path)
        if not with_backbone:
            return cls(cfg, tokenizer, NoBackbone(), layout)
        with params_on_meta() if bb_sd is not None else nullcontext():
            backbone = VAR(cfg)
        if bb_sd is not None:
            ckpt.load_into(backbone, bb_sd, cfg, "backbone", backbone_path)
        else:
            backbone.init_weights()
        return cls(cfg, tokenizer, backbone, layout)

    def save(self, tokenizer_path: str | Path | None, backbone_path: str | Path | None,
             layout: str = "plain") -> None:
        layout = ckpt.OLD_LAYOUT_NAMES.get(layout, layout)
        if layout not in ckpt.LAYOUTS:
            raise ValueError(f"unknown VAR checkpoint layout {layout!r}; choose one of {', '.join(ckpt.LAYOUTS)}")
        if tokenizer_path is not None:
            ckpt.write_tokenizer(self.tokenizer, tokenizer_path)
        if backbone_path is not None:
            extra = {"config": {"patch_nums": list(self.config.patch_nums)}}
            ckpt.write_backbone(self.backbone, backbone_path, layout, self.tokenizer, extra)

    # ---------------------------------------------------------------- schedules
    @property
    def default_schedule(self) -> Schedule:
        return Schedule(self.config.patch_nums)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        return h * self.config.downsample, w * self.config.downsample

    def _sides(self, schedule: Schedule) -> tuple[int, ...]:
        return Schedule.parse(schedule).sides

    # ---------------------------------------------------------------- model facts
    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    def resize_classes(self, num_classes: int) -> None:
        bb = self.backbone
        # upstream init_weights: every embedding ~ trunc_normal(std = sqrt(1 / (3 C)))
        bb.class_emb = resize_class_embedding(bb.class_emb, num_classes, math.sqrt(1 / bb.C / 3))
        self.config = self.config.model_copy(update={"num_classes": int(num_classes)})
        bb.cfg, bb.num_classes = self.config, int(num_classes)

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(vocab_size=int(self.config.vocab_size))

    # ---------------------------------------------------------------- conditions
    # ---------------------------------------------------------------- tokenizer side
    @torch.no_grad()
    def encode(self, images: torch.Tensor, schedule: Schedule) -> Codes:
        return self.tokenizer.encode(images, self._sides(schedule))

    @torch.no_grad()
    def teacher_inputs(self, codes: Codes, schedule: Schedule) -> torch.Tensor:
        return self.tokenizer.teacher_inputs(codes, self._sides(schedule))

    @torch.no_grad()
    def stagger_inputs(self, gt_codes: Codes, pred_codes: Codes, schedule: Schedule,
                       scales: Sequence[int]) -> torch.Tensor:
        return self.tokenizer.stagger_inputs(gt_codes, pred_codes, self._sides(schedule), scales)

    @torch.no_grad()
    def decode(self, codes: Codes, schedule: Schedule) -> torch.Tensor:
        return self.tokenizer.decode(codes, self._sides(schedule))

    def tokenizer_training_loss(self, images: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, dict]:
        return self.tokenizer.training_loss(images, self._sides(schedule))

    # ---------------------------------------------------------------- backbone side
    def transformer_blocks(self):
        return list(self.backbone.blocks)

    def generate(self, cond: Any, schedule: Schedule, *, cfg: float, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None,
                 **options: Any) -> Generation:
        sides = self._sides(schedule)
        if tuple(sides) != tuple(self.backbone.patch_nums):
            raise ValueError(f"VAR samples its own schedule {list(self.backbone.patch_nums)} only; got {list(sides)}")
        unknown = set(options) - {"more_smooth"}
        if unknown:
            raise TypeError(f"unknown VAR sampling options: {', '.join(sorted(unknown))}")
        return var_generate(self.backbone, self.tokenizer, torch.as_tensor(cond), cfg=cfg, top_k=top_k,
                            top_p=top_p, generator=generator, more_smooth=bool(options.get("more_smooth", False)))
