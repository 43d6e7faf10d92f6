"""The contract suite's generality: a tiny in-test family with bitwise codes, non-square
scales and variable-length text-feature conditions passes it through ``make_batch`` only.

Tokenizer: a strided conv to ``bits`` channels, every scale the latent area-pooled to its
(h, w) grid and binarised; scale k+1's input is scale k's +-1 bits bilinearly resized.
Backbone: a start token from mean-pooled text features (a learned null embedding for rows
of length 0: the null condition), a start position dropped when student-forcing, a few
pre-norm transformer layers under the block-causal mask, 2 logits per bit.
"""

from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from sar_core.adapter import AdapterConfig, CheckpointError, CodeSpace, Generation, ScaleWiseAdapter
from sar_core.checkpoint_io import atomic_save, load_file
from sar_core.sar.sampling import sample_logits
from sar_core.schedule import Schedule
from sar_core.testing import (AdapterContractTests, code_shape, input_slice, random_codes, random_images,
                              text_feature_batch, wrong_codes)
from sar_core.tokens import group_logits


class BitsConfig(AdapterConfig):
    bits: int = 3
    scales: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 3), (3, 4))
    downsample: int = 2
    text_dim: int = 5
    embed_dim: int = 32
    cond_drop_rate: float = 0.0


def _bits_input(bits_BLD, hw, nxt):
    x = rearrange(bits_BLD.float() * 2 - 1, "b (h w) d -> b d h w", h=hw[0], w=hw[1])
    return rearrange(F.interpolate(x, size=nxt, mode="bilinear", align_corners=False), "b d h w -> b (h w) d")


class BitsTokenizer(nn.Module):
    def __init__(self, cfg: BitsConfig):
        super().__init__()
        self.enc = nn.Conv2d(3, cfg.bits, cfg.downsample, stride=cfg.downsample)
        self.dec = nn.Linear(cfg.bits, 3 * cfg.downsample ** 2)
        self.p = cfg.downsample

    def encode(self, images, schedule):
        f = self.enc(images.float())
        return [(rearrange(F.adaptive_avg_pool2d(f, hw), "b d h w -> b (h w) d") > 0).long() for hw in schedule]

    def inputs(self, codes, schedule):
        return torch.cat([_bits_input(codes[k], schedule[k], schedule[k + 1]) for k in range(len(schedule) - 1)], 1)

    def decode(self, bits_BLD, hw):
        px = self.dec(bits_BLD.float() * 2 - 1)
        return rearrange(px, "b (h w) (c p q) -> b c (h p) (w q)", h=hw[0], w=hw[1], p=self.p, q=self.p).tanh()


class BitsBackbone(nn.Module):
    def __init__(self, cfg: BitsConfig):
        super().__init__()
        C = cfg.embed_dim
        self.cond_drop_rate = cfg.cond_drop_rate
        self.text_proj = nn.Linear(cfg.text_dim, C)
        self.null_emb = nn.Parameter(torch.randn(C) * 0.5)
        self.pos_start = nn.Parameter(torch.randn(1, 1, C) * 0.5)
        self.word_embed = nn.Linear(cfg.bits, C)
        self.lvl_embed = nn.Embedding(8, C)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(C, 2, 2 * C, 0.0, batch_first=True, norm_first=True)
                                    for _ in range(2))
        self.head = nn.Linear(C, 2 * cfg.bits)

    def forward(self, cond, inputs, schedule, student_forcing=False):
        feats, lengths = cond["features"], cond["lengths"]
        if self.cond_drop_rate > 0 and self.training:
            drop = torch.rand(lengths.shape[0], device=lengths.device) < self.cond_drop_rate
            lengths = torch.where(drop, torch.zeros_like(lengths), lengths)
        mask = (torch.arange(feats.shape[1], device=feats.device)[None] < lengths[:, None]).float()
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        sos = torch.where(lengths[:, None] > 0, self.text_proj(pooled), self.null_emb)[:, None]
        if not student_forcing:
            sos = sos + self.pos_start
        x = torch.cat([sos, self.word_embed(inputs.to(sos.dtype))], 1)
        x = x + self.lvl_embed(schedule.scale_ids(x.device))[None]
        for blk in self.blocks:
            x = blk(x, src_mask=~schedule.attention_mask(x.device))
        return self.head(x)


class BitsAdapter(ScaleWiseAdapter):
    name = "bits-test"
    config_cls = BitsConfig

    @classmethod
    def from_config(cls, config):
        cfg = config if isinstance(config, BitsConfig) else BitsConfig(**config)
        return cls(cfg, BitsTokenizer(cfg), BitsBackbone(cfg))

    @classmethod
    def load(cls, tokenizer_path, backbone_path=None, overrides=None):
        files = [load_file(p, "bits checkpoint") for p in (tokenizer_path, backbone_path) if p is not None]
        if not all(isinstance(f, dict) and "bits_config" in f for f in files):
            raise CheckpointError(f"{tokenizer_path} / {backbone_path}: not a bits-test checkpoint")
        ad = cls.from_config(BitsConfig(**{**files[0]["bits_config"], **(overrides or {})}))
        for module, f in zip((ad.tokenizer, ad.backbone), files):
            module.load_state_dict(f["state_dict"])
        return ad

    def save(self, tokenizer_path, backbone_path, layout="plain"):
        for path, module in ((tokenizer_path, self.tokenizer), (backbone_path, self.backbone)):
            if path is not None:
                atomic_save({"bits_config": self.config.model_dump(), "state_dict": module.state_dict()}, path)

    @property
    def default_schedule(self):
        return Schedule(self.config.scales)

    def image_size(self, schedule):
        h, w = Schedule.parse(schedule)[-1]
        return h * self.config.downsample, w * self.config.downsample

    @property
    def num_classes(self) -> Optional[int]:
        return None

    @property
    def code_space(self):
        return CodeSpace(bits=self.config.bits)

    def liven(self, generator):
        """The hook in use: the head reads the un-normalised residual stream, so the default
        re-draw makes the sampler nearly deterministic; a smaller head keeps it random."""
        super().liven(generator)
        with torch.no_grad():
            self.backbone.head.weight.mul_(0.25)

    def condition(self, batch):
        text = batch.conditions["text_features"]
        return {"features": text.values, "lengths": text.lengths}

    def null_condition(self, cond):
        B = cond["lengths"].shape[0]
        return {"features": cond["features"].new_zeros(B, 1, cond["features"].shape[-1]),
                "lengths": torch.zeros_like(cond["lengths"])}

    def encode(self, images, schedule):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.encode(images, Schedule.parse(schedule))

    def teacher_inputs(self, codes, schedule):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.inputs(list(codes), Schedule.parse(schedule))

    def stagger_inputs(self, gt_codes, pred_codes, schedule, scales):
        if any(not 0 <= k <= len(schedule) - 2 for k in scales):
            raise ValueError(f"stagger scales {list(scales)} out of range")
        mixed = [pred_codes[k] if k in set(scales) else gt_codes[k] for k in range(len(gt_codes))]
        return self.teacher_inputs(mixed, schedule)

    def decode(self, codes, schedule):
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            return self.tokenizer.decode(codes[-1], Schedule.parse(schedule)[-1])

    @torch.no_grad()
    def generate(self, cond, schedule, *, cfg, top_k=0, top_p=0.0, generator=None, **options):
        B, n, codes, guided_all = cond["lengths"].shape[0], len(schedule), [], []
        both = self.cfg_condition(cond)
        for k in range(n):
            sub = schedule.sub(range(k + 1))
            x = (self.tokenizer.inputs(codes + [None], sub) if k else
                 torch.zeros(B, 0, self.config.bits, device=self.device))
            logits = self.backbone(both, torch.cat([x, x]), sub)[:, sub.slice(k)].float()
            guided = self.guide_logits(logits[:B], logits[B:], k, n, cfg)
            guided_all.append(guided)
            codes.append(sample_logits(group_logits(guided, self.config.bits), top_k, top_p, generator))
        return Generation(codes, (self.decode(codes, schedule) + 1) / 2, guided_all)


class TestBitsTextNonSquareContract(AdapterContractTests):
    def make_adapter(self):
        return BitsAdapter.from_config(BitsConfig())

    def make_batch(self, adapter, batch_size, generator):
        return text_feature_batch(adapter, batch_size, generator, "text_features", adapter.config.text_dim)


# ------------------------------------------------------------------ helpers, both code spaces
SPACES = [CodeSpace(vocab_size=7), CodeSpace(bits=4)]
SCHEDULES = [Schedule([1, 2, 3]), Schedule([(1, 1), (1, 2), (2, 3)])]


@pytest.mark.parametrize("space", SPACES, ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_random_and_wrong_codes_fit_the_code_space(space, schedule):
    codes = random_codes(space, schedule, 3, torch.Generator().manual_seed(0))
    high = 2 if space.bitwise else space.vocab_size
    for k, c in enumerate(codes):
        assert tuple(c.shape) == code_shape(space, 3, schedule.token_counts[k]) and c.dtype == torch.int64
        w = wrong_codes(c, space)
        assert int(w.min()) >= 0 and int(w.max()) < high and not (w == c).any()


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
def test_input_slices_tile_the_inputs(schedule):
    covered = [i for k in range(1, len(schedule)) for i in range(schedule.total_tokens)[input_slice(schedule, k)]]
    assert covered == list(range(schedule.total_tokens - schedule.first_len))


def test_random_images_follow_a_non_square_training_size():
    ad = BitsAdapter.from_config(BitsConfig())
    img = random_images(ad, 2, torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 6, 8) and img.min() >= -1 and img.max() <= 1
