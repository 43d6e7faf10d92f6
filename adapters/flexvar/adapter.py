"""The FlexVAR adapter: FlexVAE tokenizer + FlexVAR transformer behind the sar contract.

FlexVAR quantises every scale independently, so the input of scale k+1 depends only on
the codes of scale k: bicubic(normalised codewords at k -> side k+1). Stagger inputs
replace those codes by the prediction at k; nothing below k matters.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar, Sequence

import torch

from sar_core.adapter import CodeSpace, Generation, ScaleWiseAdapter, CheckpointError
from sar_adapters.common.fresh import FreshFromConfig
from sar_adapters.common.precision import tokenizer_side
from sar_core.checkpoint_io import NoBackbone, params_on_meta
from sar_core.schedule import Schedule, ScheduleSampler

from sar_adapters.common.classes import resize_class_embedding
from sar_adapters.common.init import NO_DECAY_KEYWORDS

from . import checkpoint as ckpt
from .backbone import FlexVAR, init_weights
from .case import FlexVARCaseRunner
from .config import FlexVARConfig, check_sides, infer_flexvar_config
from .sampler import sample
from .schedules import MAX_SIDE, FlexVARRandomSchedule
from .tokenizer import VQModel, init_tokenizer, vq_training_loss



class FlexVARGeneration(Generation):
    """``Generation`` plus upstream's raw (unclamped, [-1, 1]-nominal) decoder output."""

    def __init__(self, codes, images, guided_logits, raw_images):
        super().__init__(codes, images, guided_logits)
        self.raw_images = raw_images


class FlexVARAdapter(FreshFromConfig, ScaleWiseAdapter):
    name: ClassVar[str] = "flexvar"
    reuses_prefix = True  # backbone forward takes prefix= (sar_core.sar.prefix_cache)
    prefix_stable = True  # positions per scale, block-causal: a schedule's head is its own pass
    config_cls = FlexVARConfig
    no_decay_keywords = NO_DECAY_KEYWORDS
    case_runner = FlexVARCaseRunner

    # ---------------------------------------------------------------- construction
    init_tokenizer = staticmethod(init_tokenizer)
    init_backbone = staticmethod(init_weights)

    @staticmethod
    def _build(config: FlexVARConfig, tok_on_meta: bool = False, bb_on_meta: bool = False,
               backbone: bool = True) -> tuple[VQModel, FlexVAR]:
        """The modules; with ``*_on_meta`` their parameters take no memory (a file fills them);
        ``backbone=False``: a :class:`NoBackbone` (tokenizer-only loads)."""
        with params_on_meta() if tok_on_meta else nullcontext():
            tok = VQModel(config.tokenizer)
        if not backbone:
            return tok, NoBackbone()
        with params_on_meta() if bb_on_meta else nullcontext():
            bb = FlexVAR(config.backbone, config.tokenizer.codebook_size,
                         config.tokenizer.codebook_embed_dim, config.train_schedule.sides)
        return tok, bb

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides: dict | None = None) -> "FlexVARAdapter":
        return cls._load(tokenizer_path, backbone_path, overrides, with_backbone=True)

    @classmethod
    def load_tokenizer(cls, tokenizer_path, overrides: dict | None = None) -> "FlexVARAdapter":
        return cls._load(tokenizer_path, None, overrides, with_backbone=False)

    @classmethod
    def _load(cls, tokenizer_path, backbone_path, overrides, with_backbone: bool) -> "FlexVARAdapter":
        if tokenizer_path is None:
            raise CheckpointError("the flexvar family needs a tokenizer checkpoint (FlexVAE.pth)")
        tok_sd = ckpt.read_tokenizer(tokenizer_path)
        bb_sd, layout = ckpt.read_backbone(backbone_path) if backbone_path is not None else (None, "plain")
        source = f"{tokenizer_path}{' / ' + str(backbone_path) if backbone_path else ''}"
        config = infer_flexvar_config(tok_sd, bb_sd, overrides, source)
        tok, bb = cls._build(config, tok_on_meta=True, bb_on_meta=bb_sd is not None, backbone=with_backbone)
        ckpt.load_into(tok, tok_sd, config, "tokenizer", tokenizer_path)
        if bb_sd is not None:
            ckpt.load_into(bb, bb_sd, config, "backbone", backbone_path)
        elif with_backbone:
            init_weights(bb)
        return cls(config, tok, bb)

    def save(self, tokenizer_path, backbone_path, layout: str = "plain") -> None:
        layout = ckpt.OLD_LAYOUT_NAMES.get(layout, layout)
        if layout not in ckpt.LAYOUTS:
            raise ValueError(f"unknown FlexVAR checkpoint layout {layout!r}; choose one of {ckpt.LAYOUTS}")
        if tokenizer_path is not None:
            ckpt.write_tokenizer(self.tokenizer, tokenizer_path)
        if backbone_path is not None:
            ckpt.write_backbone(self.backbone, backbone_path, layout)

    # ---------------------------------------------------------------- schedules
    @property
    def default_schedule(self) -> Schedule:
        return self.config.train_schedule

    @property
    def infer_schedule(self) -> Schedule:
        return self.config.infer_schedule

    def schedule_sampler(self, seed: int = 0) -> ScheduleSampler:
        sampler = (FlexVARRandomSchedule(self.default_schedule, seed) if self.config.random_schedule
                   else ScheduleSampler(self.default_schedule, seed))
        self.check_schedule_sampler(sampler)
        return sampler

    def check_schedule_sampler(self, sampler: ScheduleSampler) -> None:
        latent = self.config.latent_side
        if isinstance(sampler, FlexVARRandomSchedule):
            if latent < MAX_SIDE:
                raise ValueError(
                    f"random_schedule draws FlexVAR's upstream schedules, which end at side {MAX_SIDE}, "
                    f"but image_size {self.config.image_size} gives a {latent}-token latent "
                    f"with this {self.config.tokenizer.downsample}x tokenizer; use image_size >= "
                    f"{MAX_SIDE * self.config.tokenizer.downsample} or a fixed schedule (train_patch_nums)")
            return
        self._check(sampler.default)
        side = max(h for h, _ in sampler.default)
        if self.config.image_size is not None and side > latent:
            d = self.config.tokenizer.downsample
            raise ValueError(f"schedule {sampler.default} ends at side {side}, above the {latent}-token latent "
                             f"of {self.config.image_size} px images with this {d}x tokenizer; use image_size "
                             f">= {side * d} or a smaller schedule")

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        d = self.config.tokenizer.downsample
        return h * d, w * d

    def training_image_size(self, sampler: ScheduleSampler) -> tuple[int, int]:
        if self.config.image_size is not None:
            return int(self.config.image_size), int(self.config.image_size)
        return tuple(self.image_size(sampler.default))

    @classmethod
    def image_size_overrides(cls, size: tuple[int, int]) -> dict:
        h, w = size
        if h != w:
            raise ValueError(f"FlexVAR trains square images; got {h}x{w}")
        return {"image_size": int(h)}

    # ---------------------------------------------------------------- model facts
    @property
    def num_classes(self) -> int:
        return int(self.config.backbone.num_classes)

    def resize_classes(self, num_classes: int) -> None:
        bb = self.backbone
        # upstream init: every embedding ~ trunc_normal(std = 0.02)
        bb.class_emb = resize_class_embedding(bb.class_emb, num_classes, 0.02)
        backbone_cfg = self.config.backbone.model_copy(update={"num_classes": int(num_classes)})
        self.config = self.config.model_copy(update={"backbone": backbone_cfg})
        bb.cfg, bb.num_classes = backbone_cfg, int(num_classes)

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(vocab_size=int(self.config.tokenizer.codebook_size))

    # ---------------------------------------------------------------- conditions
    # ---------------------------------------------------------------- tokenizer side
    def _check(self, schedule) -> Schedule:
        schedule = Schedule.parse(schedule)
        check_sides([h for h, _ in schedule], self.config.backbone.pos_grid, f"schedule {schedule}")
        return schedule

    @tokenizer_side
    def encode(self, images: torch.Tensor, schedule: Schedule) -> list:
        schedule = self._check(schedule)
        images = images.to(self.tokenizer.quant_conv.weight.dtype)
        return self.tokenizer.quantize_scales(self.tokenizer.encode_latent(images), list(schedule))

    @tokenizer_side
    def teacher_inputs(self, codes: list, schedule: Schedule) -> torch.Tensor:
        return self.stagger_inputs(codes, codes, schedule, ())

    @tokenizer_side
    def stagger_inputs(self, gt_codes: list, pred_codes: list, schedule: Schedule,
                       scales: Sequence[int]) -> torch.Tensor:
        schedule = Schedule.parse(schedule)
        chosen = set(int(k) for k in scales)
        bad = [k for k in chosen if not 0 <= k <= len(schedule) - 2]
        if bad:
            raise ValueError(f"stagger scales {sorted(bad)} out of range for a {len(schedule)}-scale schedule")
        parts = []
        for k in range(len(schedule) - 1):
            codes = pred_codes[k] if k in chosen else gt_codes[k]
            parts.append(self.tokenizer.upsampled_input(codes, schedule[k], schedule[k + 1]))
        if not parts:
            B = gt_codes[0].shape[0]
            w = self.tokenizer.quantize.embedding.weight
            return w.new_zeros(B, 0, self.tokenizer.Cvae)
        return torch.cat(parts, dim=1)

    @tokenizer_side
    def decode_raw(self, codes: list, schedule: Schedule) -> torch.Tensor:
        """Upstream ``decode_code`` of the last scale: unclamped, nominally [-1, 1]."""
        schedule = Schedule.parse(schedule)
        return self.tokenizer.decode_indices(codes[-1], schedule[-1])

    def decode(self, codes: list, schedule: Schedule) -> torch.Tensor:
        return self.decode_raw(codes, schedule).clamp(-1, 1)

    def tokenizer_training_loss(self, images: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, dict]:
        """Multi-scale VQ loss (see ``tokenizer.vq_training_loss``); call
        ``self.tokenizer.train().requires_grad_(True)`` first."""
        return vq_training_loss(self.tokenizer, images, list(self._check(schedule)))

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def transformer_blocks(self):
        return list(self.backbone.blocks)

    def generate(self, cond: torch.Tensor, schedule: Schedule, *, cfg: float, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None,
                 max_pn: int = 16, used_llamagen_cfg: bool = False,
                 invalid_ids=None, **options: Any) -> FlexVARGeneration:
        if options:
            raise TypeError(f"unknown FlexVAR sampling options: {sorted(options)}")
        schedule = self._check(schedule)
        out = sample(self.backbone, self.tokenizer, cond, schedule, cfg, top_k, top_p,
                     generator, max_pn, used_llamagen_cfg, invalid_ids)
        images = out.raw_images.add(1).div(2).clamp(0, 1)
        return FlexVARGeneration(out.codes, images, out.guided_logits, out.raw_images)
