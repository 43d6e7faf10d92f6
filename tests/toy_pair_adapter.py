"""A two-payload family: the ``toy-pair`` adapter (a CLIP-conditioned family in miniature).

Like ``toy-bits`` (non-square schedule, bitwise codes, no classes) but conditioned on TWO
named payloads, as Switti / SD-style models are: ``clip_pooled`` (1, pooled_dim), a pooled
vector, and ``clip_tokens`` (n_i, text_dim), a token sequence. The start token is
proj(pooled) + the masked mean of proj(tokens). Its null condition is ENCODER-DERIVED:
the features of the empty prompt, which no checkpoint holds: the adapter receives them
through ``set_null_payloads`` (``--null-payload``, a data folder's ``null_payloads.pt``)
and keeps them as non-persistent backbone buffers, so condition dropout inside
``forward`` can use them (and they never enter a checkpoint).

Registered by :data:`PLUGIN` (adapter ``toy-pair``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sar_core.batch import PayloadSpec
from sar_core.hookspecs import hookimpl

from toy_bits_adapter import ToyBitsAdapter, ToyBitsBackbone, ToyBitsConfig, ToyBitsTokenizer

POOLED, TOKENS = "clip_pooled", "clip_tokens"


class ToyPairConfig(ToyBitsConfig):
    pooled_dim: int = 5


class ToyPairBackbone(ToyBitsBackbone):
    def __init__(self, cfg: ToyPairConfig):
        super().__init__(cfg)
        self.pooled_proj = nn.Linear(cfg.pooled_dim, cfg.embed_dim)
        self.register_buffer("null_pooled", None, persistent=False)   # (1, Dp), set_null_payloads
        self.register_buffer("null_tokens", None, persistent=False)   # (n0, Dt)

    def _embed(self, pooled_BD, feats_BND, lengths_B) -> torch.Tensor:
        mask_BN = torch.arange(feats_BND.shape[1], device=feats_BND.device)[None] < lengths_B[:, None]
        proj_BNC = self.text_proj(feats_BND.to(self.text_proj.weight.dtype)) * mask_BN[..., None]
        mean_BC = proj_BNC.sum(1) / lengths_B.clamp_min(1)[:, None].to(proj_BNC.dtype)
        return mean_BC + self.pooled_proj(pooled_BD.to(mean_BC.dtype))

    def text_embedding(self, cond: dict) -> torch.Tensor:
        emb = self._embed(cond["pooled"], cond["features"], cond["lengths"])
        if self.training and self.text_drop > 0:
            if self.null_tokens is None:
                raise ValueError("toy-pair condition dropout needs the null payloads (--null-payload)")
            null = self._embed(self.null_pooled, self.null_tokens[None],
                               torch.tensor([len(self.null_tokens)], device=emb.device))
            drop = torch.rand(emb.shape[0], device=emb.device) < self.text_drop
            emb = torch.where(drop[:, None], null.expand_as(emb), emb)
        return emb


class ToyPairAdapter(ToyBitsAdapter):
    name = "toy-pair"
    config_cls = ToyPairConfig

    @classmethod
    def from_config(cls, config) -> "ToyPairAdapter":
        cfg = config if isinstance(config, ToyPairConfig) else ToyPairConfig(**dict(config))
        return cls(cfg, ToyBitsTokenizer(cfg), ToyPairBackbone(cfg))

    @property
    def condition_payloads(self) -> dict:
        c = self.config
        return {POOLED: PayloadSpec(dim=c.pooled_dim, rows=1, encoded_null=True),
                TOKENS: PayloadSpec(dim=c.text_dim, encoded_null=True)}

    def set_null_payloads(self, payloads: dict) -> None:
        super().set_null_payloads(payloads)
        self.backbone.null_pooled = self.null_payload(POOLED)
        self.backbone.null_tokens = self.null_payload(TOKENS)

    def condition(self, batch) -> dict:
        self.check_payloads(batch.conditions, "the batch")
        pooled, tokens = batch.conditions[POOLED], batch.conditions[TOKENS]
        return {"pooled": pooled.values[:, 0].float(), "features": tokens.values.float(),
                "lengths": tokens.lengths.long()}

    def null_condition(self, cond: dict) -> dict:
        B = cond["lengths"].shape[0]
        pooled, tokens = self.null_payload(POOLED), self.null_payload(TOKENS)
        return {"pooled": pooled.expand(B, -1).to(cond["pooled"]),
                "features": tokens[None].expand(B, -1, -1).to(cond["features"]),
                "lengths": torch.full_like(cond["lengths"], len(tokens))}


class ToyPairPlugin:
    __name__ = "toy-pair-plugin"

    @hookimpl
    def register_adapters(self, register):
        register("toy-pair", ToyPairAdapter)


PLUGIN = ToyPairPlugin()


def toy_pair_files(tmp: Path, **overrides) -> tuple[Path, Path]:
    """Write a toy-pair tokenizer + backbone pair (seed 0) and return their paths."""
    torch.manual_seed(0)
    adapter = ToyPairAdapter.from_config(ToyPairConfig(**overrides))
    tok, bb = tmp / "pair_tok.pt", tmp / "pair_bb.pt"
    adapter.save(tok, bb)
    return tok, bb
