"""The template family's adapter: what sar needs to post-train it (docs/plugins.md).

It imports the public API only: the contract modules at the top of ``sar_core``,
``sar_core.sar.sampling``, and pieces of ``sar_adapters.common`` that are stable for reuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from sar_adapters.common.adaln import set_kv_caching
from sar_core.adapter import CheckpointError, CodeSpace, Generation, ScaleWiseAdapter
from sar_core.checkpoint_io import atomic_save, cpu_state, load_file
from sar_core.sar.sampling import sample_logits
from sar_core.schedule import Schedule

from sar_template_family.case import TemplateCaseRunner
from sar_template_family.model import Backbone, TemplateConfig, Tokenizer

__all__ = ["TemplateAdapter", "TemplateConfig"]


def _read(path, part: str) -> tuple[dict, dict]:
    """(config fields, state dict) of a template file; CheckpointError for anything else."""
    obj = load_file(path, what=f"template {part} checkpoint")
    if not (isinstance(obj, dict) and isinstance(obj.get("template_config"), dict) and "state_dict" in obj):
        raise CheckpointError(f"{path} is not a template {part} checkpoint (no template_config / state_dict)")
    return obj["template_config"], obj["state_dict"]


def _fill(module: torch.nn.Module, sd: dict, path, part: str) -> None:
    try:
        module.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the template {part} does not fit: {str(exc).splitlines()[0]}") from None


class TemplateAdapter(ScaleWiseAdapter):
    name = "template"
    config_cls = TemplateConfig
    no_decay_keywords = ("pos_start", "lvl_embed", "class_emb")
    case_runner = TemplateCaseRunner
    prefix_stable = True   # levels come from each scale's side, never from the schedule's last scale

    config: TemplateConfig
    tokenizer: Tokenizer
    backbone: Backbone

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: TemplateConfig | dict) -> "TemplateAdapter":
        cfg = config if isinstance(config, TemplateConfig) else TemplateConfig(**config)
        backbone = Backbone(cfg)
        backbone.init_weights()
        return cls(cfg, Tokenizer(cfg), backbone)

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides: Optional[dict] = None) -> "TemplateAdapter":
        if tokenizer_path is None:
            raise CheckpointError("the template family needs a tokenizer checkpoint")
        values, tok_sd = _read(tokenizer_path, "tokenizer")
        bb_sd = None
        if backbone_path is not None:
            bb_values, bb_sd = _read(backbone_path, "backbone")
            values = {**values, **bb_values}
        adapter = cls.from_config(TemplateConfig(**{**values, **(overrides or {})}))
        _fill(adapter.tokenizer, tok_sd, tokenizer_path, "tokenizer")
        if bb_sd is not None:
            _fill(adapter.backbone, bb_sd, backbone_path, "backbone")
        return adapter

    def save(self, tokenizer_path, backbone_path, layout: str = "plain") -> None:
        if layout != "plain":
            raise ValueError(f"unknown template checkpoint layout {layout!r}; choose plain")
        for path, module in ((tokenizer_path, self.tokenizer), (backbone_path, self.backbone)):
            if path is not None:
                atomic_save({"template_config": self.config.model_dump(), "state_dict": cpu_state(module.state_dict())},
                            path)

    # ---------------------------------------------------------------- facts
    @property
    def default_schedule(self) -> Schedule:
        return Schedule(self.config.sides)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        return h * self.config.downsample, w * self.config.downsample

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(vocab_size=self.config.vocab_size)

    def transformer_blocks(self):
        return list(self.backbone.blocks)

    # ---------------------------------------------------------------- tokenizer side
    @torch.no_grad()
    def encode(self, images, schedule):
        return self.tokenizer.encode(images, Schedule.parse(schedule).sides)

    @torch.no_grad()
    def teacher_inputs(self, codes, schedule):
        return self.tokenizer.inputs(list(codes), Schedule.parse(schedule).sides)

    @torch.no_grad()
    def stagger_inputs(self, gt_codes, pred_codes, schedule, scales):
        if any(not 0 <= k <= len(schedule) - 2 for k in scales):
            raise ValueError(f"stagger scales {list(scales)} out of range 0..{len(schedule) - 2}")
        chosen = set(scales)
        return self.teacher_inputs([pred_codes[k] if k in chosen else gt_codes[k] for k in range(len(gt_codes))],
                                   schedule)

    @torch.no_grad()
    def decode(self, codes, schedule):
        return self.tokenizer.decode(codes[-1], Schedule.parse(schedule).sides[-1])

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, cond, schedule, *, cfg, top_k=0, top_p=0.0, generator=None, **options) -> Generation:
        """KV-cached: one scale per step, 2B rows (condition, then null class)."""
        bb, sides, B = self.backbone, Schedule.parse(schedule).sides, cond.shape[0]
        cond_BD = bb.class_emb(self.cfg_condition(cond.to(self.device)))
        levels = bb.lvl_embed(bb.levels(schedule, self.device))[None]
        x = bb.start(cond_BD) + levels[:, :1]
        codes, guided_all = [], []
        set_kv_caching(bb.blocks, True)
        try:
            for k, side in enumerate(sides):
                for block in bb.blocks:
                    x = block(x, cond_BD, None)
                logits = bb.logits(x, cond_BD)
                guided = self.guide_logits(logits[:B], logits[B:], k, len(sides), cfg)
                guided_all.append(guided)
                codes.append(sample_logits(guided, top_k, top_p, generator))
                if k + 1 < len(sides):
                    words = bb.word_embed(self.tokenizer.next_input(codes[-1], side, sides[k + 1]))
                    x = (words + levels[:, schedule.slice(k + 1)]).repeat(2, 1, 1)
        finally:
            set_kv_caching(bb.blocks, False)
        return Generation(codes, (self.decode(codes, schedule) + 1) / 2, guided_all)

    def describe(self) -> dict:
        return {**super().describe(), "source": str(Path(__file__).parent)}
