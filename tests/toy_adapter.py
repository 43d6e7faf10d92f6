"""A tiny but complete model family for trainer tests: the ``toy`` adapter and friends.

* tokenizer: a strided conv to a latent of ``cvae`` channels; every scale is the latent
  area-downsampled to the scale's side and quantised to the nearest codeword (FlexVAR-like,
  not residual); the input of scale k+1 is scale k's codewords bilinearly resized.
* backbone: class token (+ a start position, left out in a student-forcing pass), word
  embedding of the inputs, level embeddings, a few pre-norm transformer layers under the
  schedule's block-causal mask (``ToyWithinScaleAdapter``: the within-scale mask), a
  linear head. Class dropout and dropout draw from torch's
  global RNG, so they exercise the trainer's RNG checkpointing.

Registered (as a plugin object for ``build_registry(extra_plugins=...)``): adapters
``toy`` and ``toy-within``, dataset ``toy-images`` (deterministic random images, random flips), schedule
sampler ``toy-random`` (a random subset of the default scales every step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset

from sar_core.adapter import AdapterConfig, CodeSpace, CheckpointError, Generation, ScaleWiseAdapter
from sar_core.checkpoint_io import atomic_save, load_file
from sar_core.hookspecs import hookimpl
from sar_core.sar.sampling import sample_logits
from sar_core.schedule import Schedule, ScheduleSampler


class ToyConfig(AdapterConfig):
    vocab_size: int = 16
    cvae: int = 4
    patch_nums: tuple[int, ...] = (1, 2, 3, 4)
    downsample: int = 2
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    num_classes: int = 10
    cond_drop_rate: float = 0.0
    dropout: float = 0.0


def _grid(x_BLC: torch.Tensor, side: int) -> torch.Tensor:
    return rearrange(x_BLC, "b (h w) c -> b c h w", h=side, w=side)


class ToyTokenizer(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.enc = nn.Conv2d(3, cfg.cvae, cfg.downsample, stride=cfg.downsample)
        self.codebook = nn.Parameter(torch.randn(cfg.vocab_size, cfg.cvae))
        self.dec = nn.Linear(cfg.cvae, 3 * cfg.downsample ** 2)
        self.down = cfg.downsample

    def encode(self, images: torch.Tensor, sides: Sequence[int]) -> list:
        with torch.autocast(images.device.type, enabled=False):   # codes never depend on AMP
            f = self.enc(images.float())
        codes = []
        for s in sides:
            fs = rearrange(F.adaptive_avg_pool2d(f, s), "b c h w -> b (h w) c")
            codes.append(torch.cdist(fs, self.codebook[None].expand(len(fs), -1, -1)).argmin(-1))
        return codes

    def _next_input(self, idx: torch.Tensor, side: int, nxt: int) -> torch.Tensor:
        e = _grid(self.codebook[idx], side)
        e = F.interpolate(e, size=(nxt, nxt), mode="bilinear", align_corners=False)
        return rearrange(e, "b c h w -> b (h w) c")

    def inputs(self, codes: list, sides: Sequence[int]) -> torch.Tensor:
        return torch.cat([self._next_input(codes[k], sides[k], sides[k + 1]) for k in range(len(sides) - 1)], 1)

    def decode(self, idx: torch.Tensor, side: int) -> torch.Tensor:
        px = self.dec(self.codebook[idx])
        return rearrange(px, "b (h w) (c p q) -> b c (h p) (w q)", h=side, w=side, p=self.down, q=self.down).tanh()


class ToyBackbone(nn.Module):
    def __init__(self, cfg: ToyConfig, attention: str = "block-causal"):
        super().__init__()
        C = cfg.embed_dim
        self.attention = attention
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.word_embed = nn.Linear(cfg.cvae, C)
        self.lvl_embed = nn.Embedding(16, C)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(C, cfg.num_heads, 2 * C, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.depth))
        self.head_norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size)

    def forward(self, cond: torch.Tensor, inputs: torch.Tensor, schedule: Schedule,
                student_forcing: bool = False) -> torch.Tensor:
        if schedule.first_len != 1:
            raise ValueError("the toy backbone needs a 1x1 first scale")
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(cond.shape[0], device=cond.device) < self.cond_drop_rate
            cond = torch.where(drop, torch.full_like(cond, self.num_classes), cond)
        sos = self.class_emb(cond)[:, None]
        if not student_forcing:
            sos = sos + self.pos_start
        x = torch.cat([sos, self.word_embed(inputs.to(sos.dtype))], dim=1)
        x = x + self.lvl_embed(self.levels(schedule, x.device))[None]
        mask = ~schedule.attention_mask(x.device, self.attention)
        for blk in self.blocks:
            x = blk(x, src_mask=mask)
        return self.head(self.head_norm(x))

    def levels(self, schedule: Schedule, device) -> torch.Tensor:
        """Level id of every token: the scale's index (block-causal), or its side, which a
        sub-schedule [scale 0, scale k] keeps (within-scale: scale k alone = full pass)."""
        if self.attention == "block-causal":
            return schedule.scale_ids(device)
        sides = torch.tensor([h for h, _ in schedule], device=device)
        return torch.repeat_interleave(sides, torch.tensor(schedule.token_counts, device=device))


class ToyAdapter(ScaleWiseAdapter):
    name = "toy"
    config_cls = ToyConfig
    no_decay_keywords = ("pos_start", "lvl_embed", "class_emb")

    @classmethod
    def from_config(cls, config: ToyConfig | dict) -> "ToyAdapter":
        cfg = config if isinstance(config, ToyConfig) else ToyConfig(**config)
        return cls(cfg, ToyTokenizer(cfg), ToyBackbone(cfg, cls.attention))

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides=None) -> "ToyAdapter":
        tok = load_file(tokenizer_path, "toy tokenizer")
        if not isinstance(tok, dict) or "toy_config" not in tok:
            raise CheckpointError(f"{tokenizer_path} is not a toy tokenizer file")
        values = dict(tok["toy_config"])
        bb = None
        if backbone_path is not None:
            bb = load_file(backbone_path, "toy backbone")
            if not isinstance(bb, dict) or "toy_config" not in bb:
                raise CheckpointError(f"{backbone_path} is not a toy backbone file")
            values.update(bb["toy_config"])
        values.update(overrides or {})
        adapter = cls.from_config(ToyConfig(**values))
        adapter.tokenizer.load_state_dict(tok["state_dict"])
        if bb is not None:
            adapter.backbone.load_state_dict(bb["state_dict"])
        return adapter

    def save(self, tokenizer_path, backbone_path, layout: str = "plain") -> None:
        cfg = self.config.model_dump()
        for path, module in ((tokenizer_path, self.tokenizer), (backbone_path, self.backbone)):
            if path is not None:
                sd = {k: v.detach().cpu() for k, v in module.state_dict().items()}
                atomic_save({"toy_config": cfg, "state_dict": sd}, path)

    @property
    def default_schedule(self) -> Schedule:
        return Schedule(self.config.patch_nums)

    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        h, w = Schedule.parse(schedule)[-1]
        return h * self.config.downsample, w * self.config.downsample

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def code_space(self) -> CodeSpace:
        return CodeSpace(vocab_size=self.config.vocab_size)

    @torch.no_grad()
    def encode(self, images, schedule):
        return self.tokenizer.encode(images, schedule.sides)

    @torch.no_grad()
    def teacher_inputs(self, codes, schedule):
        return self.tokenizer.inputs(list(codes), schedule.sides)

    @torch.no_grad()
    def stagger_inputs(self, gt_codes, pred_codes, schedule, scales):
        if any(not 0 <= k <= len(schedule) - 2 for k in scales):
            raise ValueError(f"stagger scales {list(scales)} out of range for {len(schedule)} scales")
        mixed = [pred_codes[k] if k in set(scales) else gt_codes[k] for k in range(len(gt_codes))]
        return self.tokenizer.inputs(mixed, schedule.sides)

    @torch.no_grad()
    def decode(self, codes, schedule):
        with torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.decode(codes[-1], schedule.sides[-1])

    @torch.no_grad()
    def generate(self, cond, schedule, *, cfg, top_k=0, top_p=0.0, generator=None, **options) -> Generation:
        sides = schedule.sides
        B = cond.shape[0]
        codes: list = []
        guided_logits: list = []
        for k in range(len(sides)):
            sub = schedule.sub(range(k + 1))
            inputs = (self.tokenizer.inputs(codes + [None], sides[: k + 1]) if k else
                      torch.zeros(B, 0, self.config.cvae, device=cond.device))
            logits = self.backbone(self.cfg_condition(cond), torch.cat([inputs, inputs]), sub)[:, sub.slice(k)]
            guided = self.guide_logits(logits[:B].float(), logits[B:].float(), k, len(sides), cfg)
            guided_logits.append(guided)
            codes.append(sample_logits(guided, top_k, top_p, generator))
        return Generation(codes, (self.decode(codes, schedule) + 1) / 2, guided_logits)


class ToyWithinScaleAdapter(ToyAdapter):
    """The toy with Switti-style attention: every token attends to its own scale only (the
    input of scale k+1 already carries scale k's codes), levels by side."""

    name = "toy-within"
    attention = "within-scale"
    prefix_stable = True

    def transformer_blocks(self):
        return list(self.backbone.blocks)


# ------------------------------------------------------------------------- data, schedules
class ToyImages(Dataset):
    """Deterministic random images of ``num_classes`` classes; flips draw from torch's RNG."""

    def __init__(self, n: int = 32, image_size: int = 8, num_classes: int = 10, hflip: bool = True,
                 nan_items: int = 0):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.rand(n, 3, image_size, image_size, generator=g) * 2 - 1
        self.labels = torch.arange(n) % num_classes
        self.hflip = hflip
        if nan_items:  # the first items are NaN: drives the non-finite guard
            self.images[:nan_items] = float("nan")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.hflip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x, self.labels[i]


def toy_images(split: str = "train", image_size: int = 8, n: int = 32, hflip: bool = True, **_):
    return ToyImages(n=n, image_size=image_size, hflip=hflip)


class ToyRandomSchedule(ScheduleSampler):
    """Keeps the first and last scale and each middle scale with p = 0.5."""

    def sample(self) -> Schedule:
        s = self.default.scales
        keep = [s[0]] + [x for x in s[1:-1] if self.rng.random() < 0.5] + [s[-1]]
        return Schedule(keep)


class ToyPlugin:
    __name__ = "toy-plugin"

    @hookimpl
    def register_adapters(self, register):
        register("toy", ToyAdapter)
        register("toy-within", ToyWithinScaleAdapter)

    @hookimpl
    def register_datasets(self, register):
        register("toy-images", toy_images)

    @hookimpl
    def register_schedules(self, register):
        register("toy-random", ToyRandomSchedule)


PLUGIN = ToyPlugin()


_BASE_REGISTRY: list = []


def make_registry(*extra: Any):
    """Entry-point plugins + the toy plugin (+ ``extra``); the plain one is built once."""
    from sar_core.plugins import build_registry

    if extra:
        return build_registry(extra_plugins=(PLUGIN, *extra))
    if not _BASE_REGISTRY:
        _BASE_REGISTRY.append(build_registry(extra_plugins=(PLUGIN,)))
    return _BASE_REGISTRY[0]


def toy_files(tmp: Path, **overrides) -> tuple[Path, Path]:
    """Write a toy tokenizer + backbone pair (seed 0) and return their paths."""
    torch.manual_seed(0)
    adapter = ToyAdapter.from_config(ToyConfig(**overrides))
    tok, bb = tmp / "toy_tok.pt", tmp / "toy_bb.pt"
    adapter.save(tok, bb)
    return tok, bb


def use_registry(monkeypatch, *extra: Any):
    """Make the CLI's process-wide registry the toy one (pytest monkeypatch)."""
    from sar_core import plugins

    reg = make_registry(*extra)
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return reg


def invoke(*args: str):
    """Run ``sar <args>`` in-process; returns the click Result."""
    from typer.testing import CliRunner

    from sar_cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def read_metrics(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


if __name__ == "__main__":  # `torchrun tests/toy_adapter.py train ...`: the CLI with the toy plugin
    from sar_core import plugins as _plugins
    from sar_cli.main import app as _app

    _plugins._REGISTRY = make_registry()
    _app()
