"""VARAdapter: FoundationVision/VAR (class-conditional, residual multi-scale VQVAE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from sar_core.adapter import CodeSpace, Codes, Generation, ScaleWiseAdapter
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes, mean_token_loss, token_ce

from . import checkpoint as ckpt
from .backbone import VAR
from .config import VARConfig, infer_var_config, make_config
from .sampler import generate as var_generate
from .tokenizer import VQVAE

#: config.json sections whose fields map onto VARConfig (golden cases)
_CASE_SECTIONS = ("tokenizer", "backbone")


class VARAdapter(ScaleWiseAdapter):
    name = "var"
    reuses_prefix = True  # backbone forward takes prefix= (sar_core.prefix_cache)
    config_cls = VARConfig
    no_decay_keywords = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                         "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                         "scale_mul")

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
        tok_sd = bb_sd = None
        layout = "plain"
        if tokenizer_path is not None:
            tok_sd, _ = ckpt.read_tokenizer(tokenizer_path)
        if backbone_path is not None:
            bb_sd, layout = ckpt.read_backbone(backbone_path)
        cfg = infer_var_config(tok_sd, bb_sd, overrides)
        tokenizer, backbone = VQVAE(cfg), VAR(cfg)
        if tok_sd is not None:
            ckpt.load_into(tokenizer, tok_sd, cfg, "tokenizer", tokenizer_path)
        if bb_sd is not None:
            ckpt.load_into(backbone, bb_sd, cfg, "backbone", backbone_path)
        else:
            backbone.init_weights()
        return cls(cfg, tokenizer, backbone, layout)

    def save(self, tokenizer_path: str | Path | None, backbone_path: str | Path | None,
             layout: str = "plain") -> None:
        extra = {"config": {"patch_nums": list(self.config.patch_nums)}}
        ckpt.save_checkpoints(self.tokenizer, self.backbone, tokenizer_path, backbone_path, layout, extra)

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

    # ---------------------------------------------------------------- conformance
    @classmethod
    def case_overrides(cls, config: dict) -> dict:
        """Hyper-parameters a golden case's config.json states (those not in tensor shapes
        included: quant_resi, using_znorm, norm_eps, patch_nums...)."""
        fields = VARConfig.model_fields
        out: dict = {}
        for section in _CASE_SECTIONS:
            for key, value in (config.get(section) or {}).items():
                if key in fields and isinstance(value, (bool, int, float, list, tuple)):
                    out[key] = tuple(value) if isinstance(value, list) else value
        if isinstance(config.get("patch_nums"), list):
            out["patch_nums"] = tuple(config["patch_nums"])
        return out

    def run_case(self, case: dict, config: dict) -> dict:
        """Every key of a VAR golden case computable from its inputs (see fixtures README)."""
        out: dict = {}
        sched = self.default_schedule
        sides = sched.sides
        dev = self.device
        bb = self.backbone
        was_training, drop = bb.training, bb.cond_drop_rate
        bb.eval()
        bb.cond_drop_rate = 0.0
        try:
            with torch.no_grad():
                if "images" in case:
                    self._case_tokenizer(case, sides, dev, out)
                    if "labels" in case:
                        logits = bb(case["labels"].to(dev), out["x_BLCv_wo_first_l"], sched)
                        out["tf_logits"] = logits
                        out["tf_loss"] = mean_token_loss(token_ce(logits, out["gt_idx_cat"], None))
                inference = (config.get("case") or {}).get("inference") or {}
                labels = case.get("infer_labels", inference.get("labels"))
                if labels is not None:
                    self._case_inference(torch.as_tensor(labels), inference, dev, out)
        finally:
            bb.cond_drop_rate = drop
            bb.train(was_training)
        return {k: _cpu(v) for k, v in out.items()}

    def _case_tokenizer(self, case: dict, sides: tuple, dev: torch.device, out: dict) -> None:
        tok = self.tokenizer
        f = tok.encode_f(case["images"].to(dev))
        idx, f_hats = tok.quantize_f(f, sides)
        out["enc_f"] = f
        out["gt_idx"] = idx
        out["gt_idx_cat"] = cat_codes(idx)
        out["f_hat_per_scale"] = f_hats
        out["x_BLCv_wo_first_l"] = tok.teacher_inputs(idx, sides)
        out["recon_img"] = tok.decode(idx, sides)

    def _case_inference(self, labels: torch.Tensor, inference: dict, dev: torch.device, out: dict) -> None:
        gen = None
        if inference.get("g_seed") is not None:
            gen = torch.Generator(device=dev).manual_seed(int(inference["g_seed"]))
        res = var_generate(self.backbone, self.tokenizer, labels.to(dev), cfg=float(inference.get("cfg", 1.5)),
                           top_k=int(inference.get("top_k", 0)), top_p=float(inference.get("top_p", 0.0)),
                           generator=gen, more_smooth=bool(inference.get("more_smooth", False)))
        out["infer_idx"] = res.codes
        out["infer_logits_cfg"] = res.guided_logits
        out["infer_img"] = res.images


def _cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, list):
        return [_cpu(x) for x in v]
    return v
