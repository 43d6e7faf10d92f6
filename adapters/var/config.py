"""VAR hyper-parameters, and how to read them off upstream state dicts.

Defaults are the official d16 release (var.md §1). ``infer_var_config`` derives every size
it can from tensor shapes; explicit overrides win, but an override that contradicts a
shape in the file is an error (the file could not load with it anyway).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from pydantic import ValidationError, model_validator

from sar_core.adapter import AdapterConfig, CheckpointError

#: upstream's ready-made schedules (utils/arg_util.py ``--pn`` 256 / 512 / 1024)
OFFICIAL_PATCH_NUMS = (
    (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
)


class VARConfig(AdapterConfig):
    """Every size of a VAR tokenizer (multi-scale VQVAE) + transformer pair."""

    # -- tokenizer (VQVAE)
    vocab_size: int = 4096
    Cvae: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    using_sa: bool = True
    using_mid_sa: bool = True
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4          # 0: one phi per scale, 1: one shared, K>1: K partially shared
    default_qresi_counts: int = 0      # phi count when share_quant_resi == 0 (0 -> one per scale)
    using_znorm: bool = False
    beta: float = 0.25                 # commitment weight (tokenizer training only)
    # -- transformer (VAR)
    depth: int = 16
    embed_dim: int = 1024
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    attn_l2_norm: bool = True
    shared_aln: bool = False
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    drop_path_rate: float = 0.1 * 16 / 24
    # -- both
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS[0]

    @model_validator(mode="after")
    def _check(self) -> "VARConfig":
        pn = self.patch_nums
        if not pn or any(p < 1 for p in pn):
            raise ValueError(f"patch_nums must be positive sides, got {pn}")
        if len(set(pn)) != len(pn):
            raise ValueError(f"patch_nums must not repeat a side, got {pn}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError("ch_mult needs at least one level and num_res_blocks >= 1")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ValueError(f"tokenizer widths {bad} are not divisible by 32 (GroupNorm groups)")
        if self.share_quant_resi < 0 or self.quant_conv_ks % 2 == 0:
            raise ValueError("share_quant_resi must be >= 0 and quant_conv_ks odd")
        if not 0.0 <= self.cond_drop_rate <= 1.0:
            raise ValueError(f"cond_drop_rate must be in [0, 1], got {self.cond_drop_rate}")
        return self

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_phi(self) -> int:
        """How many phi convolutions the quantizer holds (0 when phi is the identity)."""
        if abs(self.quant_resi) <= 1e-6:
            return 0
        if self.share_quant_resi == 0:
            return self.default_qresi_counts or len(self.patch_nums)
        return self.share_quant_resi


def make_config(values: dict) -> VARConfig:
    """Build a VARConfig with a readable error naming the offending fields."""
    try:
        return VARConfig(**values)
    except ValidationError as exc:
        lines = [f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()]
        fields = ", ".join(VARConfig.model_fields)
        raise ValueError("invalid VAR config:\n  " + "\n  ".join(lines) + f"\nknown fields: {fields}") from None


# ------------------------------------------------------------------------------ inference
def _indices(sd: dict, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := rx.match(k))})


def infer_tokenizer_sizes(sd: dict) -> dict:
    """Sizes of an upstream VQVAE state dict (keys of var.md §2.2)."""
    out: dict[str, Any] = {}
    emb = sd["quantize.embedding.weight"]
    out["vocab_size"], out["Cvae"] = int(emb.shape[0]), int(emb.shape[1])
    ch = int(sd["encoder.conv_in.weight"].shape[0])
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    mult = []
    for i in levels:
        width = int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
        if width % ch:
            raise CheckpointError(f"tokenizer level {i} has width {width}, not a multiple of ch={ch}")
        mult.append(width // ch)
    out["ch"], out["ch_mult"] = ch, tuple(mult)
    out["num_res_blocks"] = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    out["using_sa"] = f"encoder.down.{len(levels) - 1}.attn.0.qkv.weight" in sd
    out["using_mid_sa"] = "encoder.mid.attn_1.qkv.weight" in sd
    out["quant_conv_ks"] = int(sd["quant_conv.weight"].shape[-1])
    partial = _indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    non_shared = _indices(sd, r"quantize\.quant_resi\.(\d+)\.")
    if partial:
        out["share_quant_resi"] = len(partial)
    elif "quantize.quant_resi.qresi.weight" in sd:
        out["share_quant_resi"] = 1
    elif non_shared:
        out["share_quant_resi"], out["default_qresi_counts"] = 0, len(non_shared)
    else:
        out["quant_resi"] = 0.0  # phi is the identity: no convolution stored
    return out


def infer_backbone_sizes(sd: dict) -> dict:
    """Sizes of an upstream VAR state dict (keys of var.md §3.1), patch_nums excluded."""
    out: dict[str, Any] = {}
    C, Cvae = (int(s) for s in sd["word_embed.weight"].shape)
    out["embed_dim"], out["Cvae"] = C, Cvae
    out["vocab_size"] = int(sd["head.weight"].shape[0])
    out["num_classes"] = int(sd["class_emb.weight"].shape[0]) - 1
    out["depth"] = depth = len(_indices(sd, r"blocks\.(\d+)\."))
    out["mlp_ratio"] = int(sd["blocks.0.ffn.fc1.weight"].shape[0]) / C if depth else 4.0
    out["shared_aln"] = "shared_ada_lin.1.weight" in sd
    out["attn_l2_norm"] = "blocks.0.attn.scale_mul_1H11" in sd if depth else True
    if depth and out["attn_l2_norm"]:
        out["num_heads"] = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1])
    out["drop_path_rate"] = 0.1 * depth / 24  # upstream build_vae_var convention
    return out


def _squares_ok(pn: tuple[int, ...], L: int, SN: int, first_l: int) -> bool:
    return len(pn) == SN and sum(p * p for p in pn) == L and pn[0] ** 2 == first_l


def _search_schedules(L: int, SN: int, first: int, limit: int = 2, budget: int = 2_000_000) -> list[tuple]:
    """Strictly increasing sides starting at ``first`` whose squares sum to L (at most ``limit``)."""
    found: list[tuple] = []
    steps = 0

    def min_sum(p: int, k: int) -> int:  # k sides, each > p, strictly increasing
        return sum((p + i) ** 2 for i in range(1, k + 1))

    def dfs(prefix: list[int], rest: int, k: int) -> None:
        nonlocal steps
        steps += 1
        if steps > budget or len(found) >= limit:
            return
        if k == 0:
            if rest == 0:
                found.append(tuple(prefix))
            return
        p = prefix[-1]
        s = p + 1
        while s * s <= rest:
            if s * s + min_sum(s, k - 1) > rest:
                break
            dfs(prefix + [s], rest - s * s, k - 1)
            s += 1

    dfs([first], L - first * first, SN - 1)
    return found


def infer_patch_nums(sd: dict) -> tuple[int, ...]:
    """The scale schedule of a VAR state dict, from pos_1LC (L), lvl_embed (SN), pos_start."""
    L = int(sd["pos_1LC"].shape[1])
    SN = int(sd["lvl_embed.weight"].shape[0])
    first_l = int(sd["pos_start"].shape[1])
    first = math.isqrt(first_l)
    if first * first != first_l:
        raise CheckpointError(f"pos_start holds {first_l} start tokens, not a square number")
    lvl = sd.get("lvl_1L")
    if lvl is not None and tuple(lvl.shape) == (1, L) and not lvl.is_floating_point():
        counts = lvl.flatten().long().bincount(minlength=SN).tolist()
        sides = tuple(math.isqrt(c) for c in counts)
        if (len(counts) == SN and all(s * s == c for s, c in zip(sides, counts))
                and all(a < b for a, b in zip(sides, sides[1:])) and _squares_ok(sides, L, SN, first_l)):
            return sides
    for pn in OFFICIAL_PATCH_NUMS:
        if _squares_ok(pn, L, SN, first_l):
            return pn
    found = _search_schedules(L, SN, first)
    if len(found) == 1:
        return found[0]
    what = "several schedules fit" if found else "no increasing schedule fits"
    raise CheckpointError(f"cannot infer patch_nums from the backbone (L={L} tokens over SN={SN} scales, "
                          f"first side {first}): {what}; pass the override patch_nums=[...]")


def _check_override(key: str, value: Any, inferred: dict, source: str) -> None:
    if key not in inferred:
        return
    want = inferred[key]
    same = (tuple(value) == tuple(want)) if isinstance(want, tuple) else value == want
    if isinstance(want, float) and not isinstance(value, bool):
        same = math.isclose(float(value), want, rel_tol=1e-9)
    if not same:
        raise CheckpointError(f"override {key}={value!r} contradicts the {source} file, which has {key}={want!r}")


def infer_var_config(tokenizer_sd: Optional[dict], backbone_sd: Optional[dict],
                     overrides: Optional[dict] = None) -> VARConfig:
    """Config for the given state dicts (either may be None); ``overrides`` win."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(VARConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown VAR config fields in overrides: {', '.join(unknown)}; "
                         f"known fields: {', '.join(VARConfig.model_fields)}")
    tok = infer_tokenizer_sizes(tokenizer_sd) if tokenizer_sd is not None else {}
    bb = infer_backbone_sizes(backbone_sd) if backbone_sd is not None else {}
    for key in ("vocab_size", "Cvae"):
        if key in tok and key in bb and tok[key] != bb[key]:
            raise CheckpointError(f"tokenizer and backbone disagree: tokenizer has {key}={tok[key]}, "
                                  f"backbone has {key}={bb[key]} (are they from the same release?)")
    if overrides.get("default_qresi_counts") == 0 and "default_qresi_counts" in tok:
        # upstream's 0 means "one phi per scale": the count stored in the file stands
        del overrides["default_qresi_counts"]
    soft = {"drop_path_rate", "quant_resi"}  # conventions, not shapes: overrides may change them
    for key, value in overrides.items():
        if key in soft:
            continue
        _check_override(key, value, tok, "tokenizer")
        _check_override(key, value, bb, "backbone")
    if backbone_sd is not None and "patch_nums" in overrides:
        pn = tuple(int(p) for p in overrides["patch_nums"])
        L, SN = int(backbone_sd["pos_1LC"].shape[1]), int(backbone_sd["lvl_embed.weight"].shape[0])
        if not _squares_ok(pn, L, SN, int(backbone_sd["pos_start"].shape[1])):
            raise CheckpointError(f"override patch_nums={list(pn)} does not fit the backbone: it has "
                                  f"L={L} tokens over {SN} scales (pos_1LC, lvl_embed)")
    elif backbone_sd is not None:
        bb["patch_nums"] = infer_patch_nums(backbone_sd)
    values = {**tok, **bb}
    if "num_heads" not in values and "num_heads" not in overrides and "embed_dim" in values:
        C = values["embed_dim"]
        if C % 64:
            raise CheckpointError(f"cannot infer num_heads of a width-{C} backbone without attn_l2_norm; "
                                  "pass the override num_heads")
        values["num_heads"] = C // 64  # upstream: head_dim 64
    if "quant_resi" in tok and "quant_resi" in overrides and abs(overrides["quant_resi"]) > 1e-6:
        raise CheckpointError("override quant_resi is non-zero but the tokenizer stores no phi convolution")
    values.update(overrides)
    return make_config(values)
