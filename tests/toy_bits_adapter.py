"""A tiny complete family the core was not written for: the ``toy-bits`` adapter.

It differs from the class-conditional families in every way the adapter contract covers:

* NON-SQUARE schedule, (h, w) pairs ``(1, 1), (1, 2), (2, 3), (2, 4)``: images are
  (H, W) = (2 * 2, 4 * 2) = 4 x 8 pixels.
* BITWISE codes (``CodeSpace(bits=d)``): every scale is the latent area-pooled to the
  scale's grid and quantised to its sign bits, codes (B, h*w, d) in {0, 1}, logits
  (B, L, 2d); the input of scale k+1 is scale k's +-1 bits bilinearly resized.
* TEXT-FEATURE conditions of varying length (``num_classes = None``): the condition is
  ``{"features": (B, N, D), "lengths": (B,)}`` built from the batch payload
  ``text_features``; the start token is a projection of the masked mean of the features,
  or a learned null embedding for a length-0 (null) condition. Text dropout lives in the
  backbone's ``text_drop`` (not ``cond_drop_rate``): the adapter overrides
  ``condition_dropout``.

Registered by :data:`PLUGIN` (pass it to ``tests.toy_adapter.use_registry``): adapter
``toy-bits`` and dataset ``toy-text-images`` (random images, each with random text
features of 1..5 rows, no class labels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from sar_core.adapter import AdapterConfig, CheckpointError, CodeSpace, Generation, ScaleWiseAdapter
from sar_core.batch import PayloadSpec
from sar_core.checkpoint_io import atomic_save, load_file
from sar_core.data.datasets import image_hw
from sar_core.hookspecs import hookimpl
from sar_core.sar.sampling import sample_logits
from sar_core.schedule import Schedule
from sar_core.tokens import group_logits

PAYLOAD = "text_features"
KEY = "toy_bits_config"


class ToyBitsConfig(AdapterConfig):
    bits: int = 4
    text_dim: int = 6
    scales: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 3), (2, 4))
    downsample: int = 2
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    text_drop_rate: float = 0.1
    dropout: float = 0.0


def _tokens(grid_BChw: torch.Tensor) -> torch.Tensor:
    return rearrange(grid_BChw, "b c h w -> b (h w) c")


class ToyBitsTokenizer(nn.Module):
    def __init__(self, cfg: ToyBitsConfig):
        super().__init__()
        self.enc = nn.Conv2d(3, cfg.bits, cfg.downsample, stride=cfg.downsample)
        self.dec = nn.Linear(cfg.bits, 3 * cfg.downsample ** 2)
        self.down = cfg.downsample

    def encode(self, images: torch.Tensor, scales: Sequence[tuple[int, int]]) -> list:
        f = self.enc(images.float())
        return [(_tokens(F.adaptive_avg_pool2d(f, hw)) > 0).long() for hw in scales]

    def _next_input(self, bits_BnD: torch.Tensor, hw: tuple[int, int], nxt: tuple[int, int]) -> torch.Tensor:
        grid = rearrange(bits_BnD.float() * 2 - 1, "b (h w) d -> b d h w", h=hw[0], w=hw[1])
        return _tokens(F.interpolate(grid, size=nxt, mode="bilinear", align_corners=False))

    def inputs(self, codes: list, scales: Sequence[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([self._next_input(codes[k], scales[k], scales[k + 1]) for k in range(len(scales) - 1)], 1)

    def decode(self, bits_BnD: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        px = self.dec(bits_BnD.float() * 2 - 1)
        return rearrange(px, "b (h w) (c p q) -> b c (h p) (w q)", h=hw[0], w=hw[1], p=self.down, q=self.down).tanh()


def _positions(schedule: Schedule, device) -> torch.Tensor:
    """(L, 2) normalised (y, x) centre of every token."""
    out = []
    for h, w in schedule:
        ys = (torch.arange(h, device=device) + 0.5) / h
        xs = (torch.arange(w, device=device) + 0.5) / w
        out.append(torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2))
    return torch.cat(out)


class ToyBitsBackbone(nn.Module):
    def __init__(self, cfg: ToyBitsConfig):
        super().__init__()
        C = cfg.embed_dim
        self.text_drop = cfg.text_drop_rate
        self.text_proj = nn.Linear(cfg.text_dim, C)
        self.null_emb = nn.Parameter(torch.randn(1, C) * 0.02)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.pos_embed = nn.Linear(2, C)
        self.lvl_embed = nn.Embedding(16, C)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(C, cfg.num_heads, 2 * C, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, 2 * cfg.bits)

    def text_embedding(self, cond: dict) -> torch.Tensor:
        """(B, C): masked mean of the projected features; the null embedding at length 0."""
        feats_BND, lengths_B = cond["features"], cond["lengths"]
        if self.training and self.text_drop > 0:
            drop = torch.rand(lengths_B.shape[0], device=lengths_B.device) < self.text_drop
            lengths_B = torch.where(drop, torch.zeros_like(lengths_B), lengths_B)
        mask_BN = torch.arange(feats_BND.shape[1], device=feats_BND.device)[None] < lengths_B[:, None]
        proj_BNC = self.text_proj(feats_BND.to(self.text_proj.weight.dtype)) * mask_BN[..., None]
        mean_BC = proj_BNC.sum(1) / lengths_B.clamp_min(1)[:, None].to(proj_BNC.dtype)
        return torch.where((lengths_B > 0)[:, None], mean_BC, self.null_emb.expand_as(mean_BC))

    def forward(self, cond: dict, inputs: torch.Tensor, schedule: Schedule,
                student_forcing: bool = False) -> torch.Tensor:
        if schedule.first_len != 1:
            raise ValueError("the toy-bits backbone needs a 1x1 first scale")
        sos = self.text_embedding(cond)[:, None]
        if not student_forcing:
            sos = sos + self.pos_start
        x = torch.cat([sos, self.word_embed(inputs.to(sos.dtype))], dim=1)
        x = x + self.lvl_embed(schedule.scale_ids(x.device))[None] + self.pos_embed(_positions(schedule, x.device))[None]
        mask = ~schedule.attention_mask(x.device)
        for blk in self.blocks:
            x = blk(x, src_mask=mask)
        return self.head(self.head_norm(x))


def _load_strict(module: nn.Module, state: Any, path: Any) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: no state dict")
    mine = module.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    bad = [k for k in set(mine) & set(state) if not isinstance(state[k], torch.Tensor) or state[k].shape != mine[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{path} does not fit this toy-bits model: missing {missing}, unexpected "
                              f"{unexpected}, wrong shapes {sorted(bad)}")
    module.load_state_dict(state)


class ToyBitsAdapter(ScaleWiseAdapter):
    name = "toy-bits"
    config_cls = ToyBitsConfig
    no_decay_keywords = ("pos_start", "lvl_embed", "null_emb")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: ToyBitsConfig | dict) -> "ToyBitsAdapter":
        cfg = config if isinstance(config, ToyBitsConfig) else ToyBitsConfig(**config)
        return cls(cfg, ToyBitsTokenizer(cfg), ToyBitsBackbone(cfg))

    @classmethod
    def _read(cls, path, what: str) -> dict:
        obj = load_file(path, what)
        if not isinstance(obj, dict) or KEY not in obj or "state_dict" not in obj:
            raise CheckpointError(f"{path} is not a toy-bits {what.split()[-1]} file")
        return obj

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides=None) -> "ToyBitsAdapter":
        tok = cls._read(tokenizer_path, "toy-bits tokenizer")
        values = dict(tok[KEY])
        bb = cls._read(backbone_path, "toy-bits backbone") if backbone_path is not None else None
        if bb is not None:
            values.update(bb[KEY])
        values.update(overrides or {})
        adapter = cls.from_config(cls.config_cls(**values))
        _load_strict(adapter.tokenizer, tok["state_dict"], tokenizer_path)
        if bb is not None:
            _load_strict(adapter.backbone, bb["state_dict"], backbone_path)
        return adapter

    def save(self, tokenizer_path, backbone_path, layout: str = "plain") -> None:
        if layout != "plain":
            raise ValueError(f"toy-bits has one checkpoint layout ('plain'), got {layout!r}")
        cfg = self.config.model_dump()
        for path, module in ((tokenizer_path, self.tokenizer), (backbone_path, self.backbone)):
            if path is not None:
                sd = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
                atomic_save({KEY: cfg, "state_dict": sd}, path)

    # ------------------------------------------------------------ facts
    @property
    def default_schedule(self) -> Schedule:
        return Schedule(self.config.scales)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        return h * self.config.downsample, w * self.config.downsample

    @property
    def num_classes(self) -> None:
        return None

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(bits=self.config.bits)

    # ------------------------------------------------------------ conditions
    @property
    def condition_payloads(self) -> dict:
        return {PAYLOAD: PayloadSpec(dim=self.config.text_dim)}

    def condition(self, batch) -> dict:
        if PAYLOAD not in batch.conditions:
            have = ", ".join(sorted(batch.conditions)) or "none"
            raise ValueError(f"family 'toy-bits' is text-conditioned: the batch needs the payload "
                             f"'{PAYLOAD}' (it has: {have}); give --text-features or a dataset with them")
        p = batch.conditions[PAYLOAD]
        return {"features": p.values.float(), "lengths": p.lengths.long()}

    def null_condition(self, cond: dict) -> dict:
        B, D = cond["features"].shape[0], cond["features"].shape[-1]
        return {"features": cond["features"].new_zeros(B, 0, D), "lengths": torch.zeros_like(cond["lengths"])}

    @property
    def condition_dropout(self) -> float:
        return float(self.backbone.text_drop)

    @condition_dropout.setter
    def condition_dropout(self, p: float) -> None:
        self.backbone.text_drop = float(p)

    # ------------------------------------------------------------ tokenizer side (float32, even under autocast)
    def _fp32(self):
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def encode(self, images, schedule):
        with self._fp32():
            return self.tokenizer.encode(images, Schedule.parse(schedule).scales)

    @torch.no_grad()
    def teacher_inputs(self, codes, schedule):
        with self._fp32():
            return self.tokenizer.inputs(list(codes), Schedule.parse(schedule).scales)

    @torch.no_grad()
    def stagger_inputs(self, gt_codes, pred_codes, schedule, scales):
        keep = set(scales)
        if any(not 0 <= k <= len(gt_codes) - 2 for k in keep):
            raise ValueError(f"stagger scales must lie in 0..{len(gt_codes) - 2}, got {sorted(keep)}")
        mixed = [pred_codes[k] if k in keep else gt_codes[k] for k in range(len(gt_codes))]
        with self._fp32():
            return self.tokenizer.inputs(mixed, Schedule.parse(schedule).scales)

    @torch.no_grad()
    def decode(self, codes, schedule):
        with self._fp32():
            return self.tokenizer.decode(codes[-1], Schedule.parse(schedule)[-1])

    # ------------------------------------------------------------ sampling (KV-less)
    @torch.no_grad()
    def generate(self, cond, schedule, *, cfg, top_k=0, top_p=0.0, generator=None, **options) -> Generation:
        schedule = Schedule.parse(schedule)
        B, K, bits = cond["lengths"].shape[0], len(schedule), self.config.bits
        both = self.cfg_condition(cond)
        codes, seen = [], []
        for k in range(K):
            sub = schedule.sub(range(k + 1))
            inputs = (self.tokenizer.inputs(codes + [None], sub.scales) if k else
                      cond["features"].new_zeros(B, 0, bits))
            logits = self.backbone(both, torch.cat([inputs, inputs]), sub)[:, sub.slice(k)].float()
            guided = self.guide_logits(logits[:B], logits[B:], k, K, cfg)
            seen.append(guided)
            codes.append(sample_logits(group_logits(guided, bits), top_k, top_p, generator))
        return Generation(codes, (self.decode(codes, schedule) + 1) / 2, seen)


# ------------------------------------------------------------------------- data
class ToyTextImages(Dataset):
    """Random (3, H, W) images, each with random text features (n_i, D), n_i in 1..5.

    Items ``(image, {"text_features": (n_i, D)})``: no class labels. Flips (when
    augmenting) draw from torch's global RNG, which the trainer seeds per item."""

    def __init__(self, n: int = 24, image_size: int | tuple[int, int] = (4, 8), text_dim: int = 6,
                 augment: bool = True):
        h, w = image_hw(image_size)
        g = torch.Generator().manual_seed(4321)
        self.images = torch.rand(n, 3, h, w, generator=g) * 2 - 1
        lengths = torch.randint(1, 6, (n,), generator=g)
        self.features = [torch.randn(int(m), text_dim, generator=g) for m in lengths]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, {PAYLOAD: self.features[i]}


def toy_text_images(split: str = "train", image_size: int | tuple[int, int] = (4, 8), n: int = 24,
                    augment: bool | None = None, **_) -> ToyTextImages:
    return ToyTextImages(n=n if split == "train" else max(n // 2, 1), image_size=image_size,
                         augment=(split == "train") if augment is None else bool(augment))


class ToyBitsPlugin:
    __name__ = "toy-bits-plugin"

    @hookimpl
    def register_adapters(self, register):
        register("toy-bits", ToyBitsAdapter)

    @hookimpl
    def register_datasets(self, register):
        register("toy-text-images", toy_text_images)


PLUGIN = ToyBitsPlugin()


def toy_bits_files(tmp: Path, **overrides) -> tuple[Path, Path]:
    """Write a toy-bits tokenizer + backbone pair (seed 0) and return their paths."""
    torch.manual_seed(0)
    adapter = ToyBitsAdapter.from_config(ToyBitsConfig(**overrides))
    tok, bb = tmp / "bits_tok.pt", tmp / "bits_bb.pt"
    adapter.save(tok, bb)
    return tok, bb
