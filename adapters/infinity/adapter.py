"""The Infinity adapter: BSQ-VAE tokenizer + Infinity transformer behind the sar contract.

Codes are bits: one int64 (B, h*w, d) tensor per scale. The input of scale k+1 is the
running sum of every coarser scale's codes (trilinear at the last grid) resized to scale
k+1, so a stagger input replaces the codes at k on top of the history below k. With
Bitwise Self-Correction on (``bsc_layers`` > 0) ``encode`` in training mode returns the
clean labels plus the corrupted history they were re-quantised against (:class:`BitCodes`);
teacher and stagger inputs are then built on that history, so BSC and SAR compose.

The condition is text: ``batch.conditions["text_features"]`` (a Padded (B, N, Ct5) with
lengths) -> upstream's compact layout (see :mod:`.text`). With ``stand_in_classes`` = N > 0
the model is also class-conditional: class c is a fixed pseudo-prompt of
``stand_in_tokens`` standard-normal feature rows drawn from a constant seed (a frozen
"text encoder" of N prompts), so miniatures train on labelled data and studies sample by
class; the backbone and its checkpoints are unchanged.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar, Optional, Sequence

import torch

from sar_adapters.common.overrides import merge_overrides
from sar_core.adapter import CheckpointError, CodeSpace, Generation, ScaleWiseAdapter
from sar_adapters.common.fresh import FreshFromConfig
from sar_adapters.common.precision import tokenizer_side
from sar_core.checkpoint_io import NoBackbone, params_on_meta
from sar_core.batch import PayloadSpec
from sar_core.schedule import Schedule

from . import bsq
from . import checkpoint as ckpt
from .backbone import Infinity, init_weights
from .case import InfinityCaseRunner
from .config import BackboneConfig, InfinityConfig, TokenizerConfig
from .patchify import TokenGrid
from .sampler import generate, to_uint8_bgr
from .templates import TEMPLATES, nearest_ratio, schedule_template
from .text import cat_text, padded_to_compact, text_condition
from .tokenizer import BSQVAE, init_tokenizer

TEXT_KEY = "text_features"
STAND_IN_SEED = 20251206  # fixed: changing it changes what every stand-in class means
NO_DECAY = ("cfg_uncond", "pos_start", "lvl_embed", "scale_mul", "ada_gss", "mat_q")



class InfinityGeneration(Generation):
    """``Generation`` plus the decoder input and upstream's uint8 BGR image."""

    def __init__(self, codes, images, guided_logits, summed, raw_images):
        super().__init__(codes, images, guided_logits)
        self.summed_codes, self.raw_images = summed, raw_images

    @property
    def uint8_bgr(self) -> torch.Tensor:
        return to_uint8_bgr(self.raw_images)


def apply_overrides(cfg: dict, overrides: Optional[dict]) -> dict:
    """Merge overrides (nested, dotted ``backbone.depth`` or bare field names; top-level
    fields of InfinityConfig first)."""
    return merge_overrides(cfg, overrides, {"tokenizer": TokenizerConfig, "backbone": BackboneConfig},
                           top=InfinityConfig)


class InfinityAdapter(FreshFromConfig, ScaleWiseAdapter):
    name: ClassVar[str] = "infinity"
    config_cls = InfinityConfig
    no_decay_keywords = NO_DECAY
    case_runner = InfinityCaseRunner
    prefix_stable = True  # RoPE positions come from the template, not the schedule's last scale

    # ---------------------------------------------------------------- construction
    init_tokenizer = staticmethod(init_tokenizer)
    init_backbone = staticmethod(init_weights)

    @staticmethod
    def _build(config: InfinityConfig, tok_on_meta: bool = False, bb_on_meta: bool = False,
               backbone: bool = True) -> tuple[BSQVAE, Infinity]:
        """The modules; with ``*_on_meta`` their parameters take no memory (a file fills them);
        ``backbone=False``: a :class:`NoBackbone` (tokenizer-only loads)."""
        with params_on_meta() if tok_on_meta else nullcontext():
            tok = BSQVAE(config.tokenizer)
        if not backbone:
            return tok, NoBackbone()
        with params_on_meta() if bb_on_meta else nullcontext():
            bb = Infinity(config.backbone, config.token_bits, config.h_div_w)
        return tok, bb

    def __init__(self, config: InfinityConfig, tokenizer, backbone):
        super().__init__(config, tokenizer, backbone)
        self.grid = TokenGrid(config.patch_factor)
        self._stand_in: Optional[torch.Tensor] = None

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides: dict | None = None) -> "InfinityAdapter":
        return cls._load(tokenizer_path, backbone_path, overrides, with_backbone=True)

    @classmethod
    def load_tokenizer(cls, tokenizer_path, overrides: dict | None = None) -> "InfinityAdapter":
        return cls._load(tokenizer_path, None, overrides, with_backbone=False)

    @classmethod
    def _load(cls, tokenizer_path, backbone_path, overrides, with_backbone: bool) -> "InfinityAdapter":
        if tokenizer_path is None:
            raise CheckpointError("the infinity family needs a tokenizer checkpoint (e.g. infinity_vae_d32reg.pth)")
        tok_sd = ckpt.read_tokenizer(tokenizer_path)
        raw = {"tokenizer": ckpt.infer_tokenizer(tok_sd)}
        bb_sd = None
        if backbone_path is not None:
            bb_sd = ckpt.read_backbone(backbone_path)
            raw["backbone"] = ckpt.infer_backbone(bb_sd)
            # Infinity-8B: the transformer sees pixel_unshuffle(2) of the tokenizer's bits
            raw["spatial_patchify"] = ckpt.backbone_bits(bb_sd) == 4 * raw["tokenizer"]["codebook_dim"]
        try:
            config = InfinityConfig(**apply_overrides(raw, overrides))
        except ValueError as exc:
            raise CheckpointError(f"invalid Infinity configuration from {tokenizer_path}"
                                  f"{' / ' + str(backbone_path) if backbone_path else ''}: {exc}") from exc
        if bb_sd is not None and ckpt.backbone_bits(bb_sd) != config.token_bits:
            raise CheckpointError(
                f"backbone {backbone_path} predicts {ckpt.backbone_bits(bb_sd)} bits per token, but tokenizer "
                f"{tokenizer_path} has d = {config.tokenizer.codebook_dim} ({config.token_bits} bits per token "
                f"with spatial_patchify={config.spatial_patchify}); use the tokenizer the backbone was trained "
                "with (e.g. infinity_vae_d32reg.pth for infinity_2b_reg.pth)")
        tok, bb = cls._build(config, tok_on_meta=True, bb_on_meta=bb_sd is not None, backbone=with_backbone)
        ckpt.load_tokenizer_state(tok, tok_sd, tokenizer_path)
        if bb_sd is not None:
            ckpt.load_backbone_state(bb, bb_sd, backbone_path)
        elif with_backbone:
            init_weights(bb)
        return cls(config, tok, bb)

    def save(self, tokenizer_path, backbone_path, layout: str = "plain") -> None:
        if tokenizer_path is not None:
            ckpt.write_tokenizer(self.tokenizer, tokenizer_path)
        if backbone_path is not None:
            ckpt.write_backbone(self.backbone, backbone_path, layout)

    # ---------------------------------------------------------------- schedules
    @property
    def default_schedule(self) -> Schedule:
        return self.config.train_schedule

    def check_schedule(self, schedule) -> Schedule:
        schedule = Schedule.parse(schedule)
        schedule_template(schedule, self.config.h_div_w)
        return schedule

    def check_schedule_sampler(self, sampler) -> None:
        """RoPE tables exist for template schedules only (spec §2.2)."""
        self.check_schedule(sampler.default)

    def transformer_blocks(self) -> list:
        """Every CrossAttnBlock (upstream checkpoints 'full-block' the same units)."""
        return self.backbone.all_blocks()

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        p = self.config.tokenizer.patch_size * self.config.patch_factor
        return h * p, w * p

    def training_image_sizes(self, sampler) -> list[tuple[int, int]]:
        """The default size first, then every other template's, cut to the default length."""
        n, sizes = len(sampler.default), [tuple(self.training_image_size(sampler))]
        for grids in TEMPLATES.values():
            hw = tuple(self.image_size(Schedule(grids[:n])))
            if hw not in sizes:
                sizes.append(hw)
        return sizes

    def schedule_for_image_size(self, size: tuple[int, int], schedule: Schedule) -> Schedule:
        """The template nearest ``size``'s h/w, cut to the drawn schedule's length."""
        h, w = size
        picked = Schedule(TEMPLATES[nearest_ratio(h / w)][: len(schedule)])
        if tuple(self.image_size(picked)) != (h, w):
            raise ValueError(f"{h}x{w} images match no Infinity template of {len(schedule)} scales; "
                             "use the image_sizes the trainer gives the dataset (docs/infinity.md)")
        return picked

    @classmethod
    def image_size_overrides(cls, size: tuple[int, int]) -> dict:
        h, w = size
        return {"h_div_w": float(h) / float(w)}

    # ---------------------------------------------------------------- model facts
    @property
    def num_classes(self) -> Optional[int]:
        return self.config.stand_in_classes or None

    def stand_in_features(self) -> torch.Tensor:
        """(classes, tokens, Ct5) float32: the pseudo-prompt of every stand-in class."""
        c = self.config
        g = torch.Generator().manual_seed(STAND_IN_SEED)
        return torch.randn(c.stand_in_classes, c.stand_in_tokens, c.backbone.text_channels, generator=g)

    def condition_from_labels(self, labels: torch.Tensor) -> dict:
        if self.num_classes is None:
            return super().condition_from_labels(labels)
        labels = torch.as_tensor(labels).long().cpu()
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes - 1} (stand_in_classes)")
        if self._stand_in is None:
            self._stand_in = self.stand_in_features()
        feats = self._stand_in[labels].to(self.device)
        lens = torch.full((len(labels),), self.config.stand_in_tokens, dtype=torch.int64)
        return text_condition(feats.flatten(0, 1), lens)

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(bits=int(self.config.token_bits))

    # ---------------------------------------------------------------- conditions
    @property
    def condition_payloads(self) -> dict:
        """T5 features (n_i, Ct5); optional with stand-in classes (labels do). The null text is
        the learned ``cfg_uncond`` of the checkpoint, so no null payload is needed."""
        return {TEXT_KEY: PayloadSpec(dim=int(self.config.backbone.text_channels), required=self.num_classes is None)}

    def condition(self, batch) -> dict:
        feats = batch.conditions.get(TEXT_KEY)
        if feats is None and self.num_classes is not None and batch.labels is not None:
            return self.condition_from_labels(batch.labels)
        if feats is None:
            names = ", ".join(sorted(batch.conditions)) or "none"
            raise ValueError(f"family 'infinity' is text-conditioned: the batch needs '{TEXT_KEY}' "
                             f"(pre-computed T5 features, see docs/infinity.md); it has: {names}")
        return self.text_condition(padded_to_compact(feats.values, feats.lengths), feats.lengths)

    def example_batch(self, batch_size, image_size=None, condition_tokens=None, generator=None):
        """The default's, with ``condition_tokens`` (default ``text_maxlen``) rows of T5 features."""
        n, maxlen = condition_tokens or self.config.backbone.text_maxlen, self.config.backbone.text_maxlen
        if not 1 <= n <= maxlen:
            raise ValueError(f"condition_tokens must lie in 1..{maxlen} (text_maxlen), got {n}")
        return super().example_batch(batch_size, image_size, n, generator)

    def text_condition(self, kv_compact: torch.Tensor, lens) -> dict:
        ct5 = self.config.backbone.text_channels
        if kv_compact.shape[-1] != ct5:
            raise ValueError(f"text features are {kv_compact.shape[-1]}-wide but the backbone expects "
                             f"Ct5 = {ct5} (use the text encoder the checkpoint was trained with)")
        return text_condition(kv_compact, lens)

    def null_condition(self, cond: dict) -> dict:
        return {**cond, "null": torch.ones_like(cond["null"])}

    def cfg_condition(self, cond: dict) -> dict:
        return cat_text([cond, self.null_condition(cond)])

    # ---------------------------------------------------------------- guidance
    def guidance_scale(self, step: int, num_steps: int, cfg: float) -> float:
        """Upstream guides every scale with the same cfg (cfg_list = [cfg] * K): t = cfg - 1."""
        return float(cfg) - 1.0

    def guide_logits(self, cond_logits, uncond_logits, step, num_steps, cfg):
        """(cfg * cond + (1 - cfg) * uncond) / tau, tau from the config (upstream divides
        both branches by tau before mixing)."""
        t = self.guidance_scale(step, num_steps, cfg)
        return ((1 + t) * cond_logits - t * uncond_logits) / self.config.tau

    # ---------------------------------------------------------------- tokenizer side
    @property
    def bsc_active(self) -> bool:
        return self.config.bsc_layers > 0 and self.backbone.training

    @tokenizer_side
    def encode(self, images: torch.Tensor, schedule: Schedule) -> bsq.BitCodes:
        schedule = self.check_schedule(schedule)
        q = self.quantise(self.tokenizer.features(images), schedule)
        return bsq.BitCodes(q.labels, q.history if self.bsc_active else None)

    def quantise(self, features, schedule: Schedule, flip_masks=None) -> bsq.Quantised:
        """The training quantisation on the tokenizer grid; bits and inputs returned on the
        transformer's (identical without spatial patchify; ``fhat`` stays on the tokenizer's)."""
        c, g = self.config, self.grid
        layers = c.bsc_layers if (self.bsc_active or flip_masks is not None) else 0
        masks = None if flip_masks is None else [g.to_tok(torch.as_tensor(m), schedule[k])
                                                 for k, m in enumerate(flip_masks)]
        q = bsq.multiscale(features, g.tok_schedule(schedule), masks, layers, c.bsc_strength, c.bsc_requant)
        if g.f == 1:
            return q

        def model(xs):
            return [g.to_model(x, schedule[k]) for k, x in enumerate(xs)]

        return bsq.Quantised(model(q.labels), model(q.history), g.inputs_to_model(q.inputs, schedule), q.fhat,
                             model(q.flip_masks))

    def _tok_bits(self, bits: list, schedule: Schedule) -> list:
        return [None if b is None else self.grid.to_tok(b, schedule[k]) for k, b in enumerate(bits)]

    def _history(self, codes: list) -> list:
        if self.bsc_active and not (isinstance(codes, bsq.BitCodes) and codes.history is not None):
            raise ValueError("Bitwise Self-Correction re-quantises tokenizer features, so it trains on images, "
                             "not on a code cache: pass an image dataset or set model.overrides.bsc_layers=0")
        return bsq.history_of(codes)

    @tokenizer_side
    def teacher_inputs(self, codes: list, schedule: Schedule) -> torch.Tensor:
        schedule = Schedule.parse(schedule)
        x = bsq.next_inputs(self._tok_bits(self._history(codes), schedule), self.grid.tok_schedule(schedule))
        return self.grid.inputs_to_model(x, schedule)

    @tokenizer_side
    def stagger_inputs(self, gt_codes: list, pred_codes: list, schedule: Schedule,
                       scales: Sequence[int]) -> torch.Tensor:
        schedule = Schedule.parse(schedule)
        chosen = sorted(set(int(k) for k in scales))
        bad = [k for k in chosen if not 0 <= k <= len(schedule) - 2]
        if bad:
            raise ValueError(f"stagger scales {bad} out of range for a {len(schedule)}-scale schedule")
        pred = self._tok_bits([pred_codes[k] if k in chosen else None for k in range(len(schedule))], schedule)
        x = bsq.next_inputs(self._tok_bits(self._history(gt_codes), schedule), self.grid.tok_schedule(schedule),
                            {k: pred[k] for k in chosen})
        return self.grid.inputs_to_model(x, schedule)

    def mix_codes(self, codes: list, replace: dict) -> list:
        """Under BSC the inputs read the (flipped) history: replaced there too, kept below."""
        history = codes.history if isinstance(codes, bsq.BitCodes) else None
        return bsq.BitCodes([replace.get(k, c) for k, c in enumerate(codes)],
                            None if history is None else [replace.get(k, h) for k, h in enumerate(history)])

    @tokenizer_side
    def decode(self, codes: list, schedule: Schedule) -> torch.Tensor:
        schedule = Schedule.parse(schedule)
        bits = self._tok_bits(list(codes), schedule)
        return self.tokenizer.decode_map(bsq.summed_codes(bits, self.grid.tok_schedule(schedule)))

    def tokenizer_training_loss(self, images: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, dict]:
        return self.tokenizer.training_loss(images, self.grid.tok_schedule(self.check_schedule(schedule)))

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, cond: dict, schedule: Schedule, *, cfg: float, top_k: int = 0, top_p: float = 0.0,
                 generator: torch.Generator | None = None, tau=None, cfg_insertion_layer: Optional[int] = None,
                 gt_leak: Sequence[torch.Tensor] = (), **options: Any) -> InfinityGeneration:
        if options:
            raise TypeError(f"unknown Infinity sampling options: {sorted(options)}")
        schedule = self.check_schedule(schedule)
        top_k = int(top_k) or int(self.config.backbone.top_k)   # upstream: 0 -> the model's default
        insertion = self.config.cfg_insertion_layer if cfg_insertion_layer is None else int(cfg_insertion_layer)
        tau = self.config.tau if tau is None else tau
        out = generate(self.backbone, cond, self.null_condition(cond), schedule, cfg, tau, top_k, float(top_p),
                       generator, insertion, gt_leak, self.grid)
        with torch.autocast(self.device.type, enabled=False):
            raw = self.tokenizer.decode_map(out.summed)
        return InfinityGeneration(out.bits, raw.add(1).div(2), out.guided_logits, out.summed, raw)
