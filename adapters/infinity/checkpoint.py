"""Reading and writing Infinity checkpoints in the upstream layouts (spec §3.2, §9).

* Tokenizer (``infinity_vae_d32reg.pth``): ``{'vae': state_dict}`` (also a plain state
  dict or a training checkpoint's ``trainer.vae_local``). Names may be wrapped
  (``….conv.weight``, ``….norm.weight``, as released) or bare (``….weight``); both load.
  The quantiser's ``lfq.mask`` buffer is rebuilt (it only depends on d).
* Backbone (``infinity_2b_reg.pth``): a plain ``Infinity.state_dict()`` with
  ``block_chunks.{c}.module.{j}.*`` (or ``blocks.{i}.*``) keys, or a training checkpoint
  (``trainer.gpt_fsdp`` / ``trainer.gpt_wo_ddp``). Legacy buffers (``lvl_1L``,
  ``attn_bias_for_masking``, ``Infinity_visible_kvlen``, ``Infinity_invisible_qlen``) are
  dropped; ``zero_k_bias`` (always zero) is rebuilt when absent.

Unlike upstream's non-strict loaders, every parameter must be filled: a missing,
unexpected or mis-shaped key is one :class:`CheckpointError` that names the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import (assign_state, atomic_save, check_keys, cpu_state, is_safetensors, load_file,
                                    strip_prefix, unwrap_state_dict)

TOKENIZER_NESTED = (("vae",), ("trainer", "vae_local"), ("vae_local",))
BACKBONE_NESTED = (("trainer", "gpt_fsdp"), ("trainer", "gpt_wo_ddp"), ("gpt_fsdp",), ("gpt_wo_ddp",))
LEGACY = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")
TOKENIZER_IGNORE = ("lfq.mask",)
#: ``trainer-weights``: the weights at ``['trainer']['gpt_fsdp']`` as upstream's training
#: checkpoints keep them, without optimizer state or args: loaders that take
#: ``['trainer']['gpt_fsdp']`` read it, upstream training cannot resume from it. ``nested``
#: is its old name, still accepted when saving.
LAYOUTS = ("plain", "trainer-weights")
OLD_LAYOUT_NAMES = {"nested": "trainer-weights"}
FIX = ("check that the tokenizer and backbone files belong together and come from FoundationVision/"
       "Infinity; sizes are read from the files, so a mismatch means another architecture variant "
       "(e.g. a flash-attn build with other parameter shapes): convert it to the released layout, or "
       "override the size with --set model.overrides.<field>=<value>")


def _clean(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod.", "module."):
        sd = strip_prefix(sd, prefix)
    return sd


def _count(sd: dict, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def wrap_names(sd: dict, expected) -> dict:
    """Bare conv / norm names -> upstream's wrapped ones (``X.weight`` -> ``X.conv.weight``)."""
    out = {}
    for k, v in sd.items():
        if k not in expected and "." in k:
            head, leaf = k.rsplit(".", 1)
            for inner in ("conv", "norm"):
                if f"{head}.{inner}.{leaf}" in expected:
                    k = f"{head}.{inner}.{leaf}"
                    break
        out[k] = v
    return out


def _w(sd: dict, name: str) -> torch.Tensor:
    """A conv / norm weight under its wrapped or bare name."""
    for key in (f"{name}.conv.weight", f"{name}.norm.weight", f"{name}.weight"):
        if key in sd:
            return sd[key]
    raise CheckpointError(f"the Infinity tokenizer lacks {name}.weight")


def read_tokenizer(path: str | Path) -> dict:
    obj = load_file(path, what="Infinity tokenizer checkpoint")
    sd, _ = unwrap_state_dict(obj, TOKENIZER_NESTED, f"Infinity tokenizer {path}")
    sd = _clean(sd)
    if not any(k.startswith("encoder.conv_in.") for k in sd) or not any(k.startswith("decoder.conv_out.") for k in sd):
        if any(k.startswith(("block_chunks.", "blocks.", "word_embed.")) for k in sd):
            raise CheckpointError(f"{path} is an Infinity transformer, given where the BSQ-VAE tokenizer "
                                  "(e.g. infinity_vae_d32reg.pth) was expected; swap --tokenizer and --backbone")
        raise CheckpointError(f"{path} is not an Infinity BSQ-VAE tokenizer: it lacks encoder.conv_in / "
                              "decoder.conv_out (expected a file like infinity_vae_d32reg.pth)")
    return sd


def read_backbone(path: str | Path) -> dict:
    obj = load_file(path, what="Infinity backbone checkpoint")
    sd, _ = unwrap_state_dict(obj, BACKBONE_NESTED + (("vae",),), f"Infinity backbone {path}")
    sd = _clean(sd)
    if any(k.startswith(("encoder.", "decoder.")) for k in sd):
        raise CheckpointError(f"{path} is a tokenizer checkpoint, given where the Infinity transformer "
                              "(e.g. infinity_2b_reg.pth) was expected; swap --tokenizer and --backbone")
    needed = ("word_embed.weight", "head.weight", "pos_start", "cfg_uncond", "text_norm.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{path} is not an Infinity transformer: it lacks {', '.join(missing)}")
    return {k: v for k, v in sd.items() if k.split(".")[-1] not in LEGACY}


def infer_tokenizer(sd: dict) -> dict:
    ch = _w(sd, "encoder.conv_in").shape[0]
    levels = _count(sd, r"encoder\.down\.(\d+)\.")
    mult = tuple(_w(sd, f"encoder.down.{i}.block.0.conv1").shape[0] // ch for i in range(levels))
    downs = sum(any(k.startswith(f"encoder.down.{i}.downsample.") for k in sd) for i in range(levels))
    return {"codebook_dim": _w(sd, "encoder.conv_out").shape[0], "base_ch": ch, "ch_mult": mult,
            "num_res_blocks": _count(sd, r"encoder\.down\.0\.block\.(\d+)\."), "patch_size": 2 ** downs}


def block_prefix(sd: dict) -> tuple[int, int]:
    """(chunks, blocks per chunk) from ``block_chunks.c.module.j`` or ``blocks.i`` keys."""
    chunks = _count(sd, r"block_chunks\.(\d+)\.module\.")
    if chunks:
        return chunks, _count(sd, r"block_chunks\.0\.module\.(\d+)\.")
    return 1, _count(sd, r"blocks\.(\d+)\.")


def first_block(sd: dict) -> str:
    return "block_chunks.0.module.0." if any(k.startswith("block_chunks.") for k in sd) else "blocks.0."


def infer_backbone(sd: dict) -> dict:
    chunks, per = block_prefix(sd)
    if chunks * per == 0:
        raise CheckpointError("the Infinity backbone has no transformer blocks (block_chunks.* / blocks.*)")
    b = first_block(sd)
    maxlen, ct5 = sd["cfg_uncond"].shape
    return {"depth": chunks * per, "block_chunks": chunks, "embed_dim": sd["pos_start"].shape[-1],
            "num_heads": sd[b + "sa.scale_mul_1H11"].shape[1], "mlp_hidden": sd[b + "ffn.fc1.weight"].shape[0],
            "text_channels": ct5, "text_maxlen": maxlen,
            "text_pool_heads": sd["text_proj_for_sos.ca.mat_q"].shape[1]}


def backbone_bits(sd: dict) -> int:
    return int(sd["word_embed.weight"].shape[1])


def load_tokenizer_state(model: torch.nn.Module, sd: dict, path) -> None:
    c = model.cfg
    hint = (f"an Infinity BSQ-VAE (d {c.codebook_dim}, base_ch {c.base_ch}, ch_mult {list(c.ch_mult)}, "
            f"{c.num_res_blocks} res blocks, stride {c.patch_size})")
    expected = model.state_dict()
    sd = wrap_names(sd, expected)
    _check(sd, expected, f"tokenizer {path}", hint, TOKENIZER_IGNORE)
    assign_state(model, {k: v for k, v in sd.items() if not k.endswith(TOKENIZER_IGNORE)}, f"tokenizer {path}")


def fit_cfg_uncond(sd: dict, model: torch.nn.Module) -> dict:
    """Upstream's load_state_dict adapts cfg_uncond to the model's text_maxlen (rows the
    file lacks keep the model's own: zeros, as built, when the model is on the meta device)."""
    want = model.cfg_uncond
    have = sd["cfg_uncond"]
    if have.shape[1] == want.shape[1] and have.shape[0] != want.shape[0]:
        n = min(have.shape[0], want.shape[0])
        rest = (torch.zeros(want.shape[0] - n, want.shape[1], dtype=want.dtype) if want.is_meta
                else want.detach()[n:].cpu())
        sd = dict(sd, cfg_uncond=torch.cat([have[:n].to(want.dtype), rest], 0))
    return sd


def load_backbone_state(model: torch.nn.Module, sd: dict, path) -> None:
    c = model.cfg
    hint = (f"an Infinity transformer (depth {c.depth} in {c.block_chunks} chunks, width {c.embed_dim}, "
            f"{c.num_heads} heads, FFN {c.mlp_hidden}, {model.bits} bits, text {c.text_channels} x "
            f"{c.text_maxlen})")
    sd = fit_cfg_uncond(sd, model)
    _check(sd, model.state_dict(), f"backbone {path}", hint, ("zero_k_bias",))
    assign_state(model, {k: v for k, v in sd.items() if not k.endswith("zero_k_bias")}, f"backbone {path}")


def _check(sd, expected, what, hint, ignore) -> None:
    try:
        check_keys(sd, expected, what, hint, ignore=ignore)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\nfix: {FIX}") from None


def write_tokenizer(model: torch.nn.Module, path: str | Path) -> None:
    """``{'vae': sd}`` as upstream; a ``.safetensors`` path gets the plain state dict."""
    sd = _cpu(model.state_dict())
    atomic_save(sd if is_safetensors(path) else {"vae": sd}, path)


def write_backbone(model: torch.nn.Module, path: str | Path, layout: str = "plain") -> None:
    layout = OLD_LAYOUT_NAMES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown Infinity checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    sd = _cpu(model.state_dict())
    plain = layout == "plain" or is_safetensors(path)  # .safetensors: always the plain state dict
    atomic_save(sd if plain else {"epoch": 0, "iter": 0, "trainer": {"gpt_fsdp": sd}}, path)


def _cpu(sd: dict) -> dict:
    return cpu_state(sd)
