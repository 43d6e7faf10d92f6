"""Reading and writing FlexVAR checkpoints in the upstream layouts.

* Tokenizer (``FlexVAE.pth``): ``{'model': state_dict}``; a plain state dict, or the
  training checkpoint's ``{'trainer': {'vae_local': state_dict}, ...}``, is accepted.
  ``quantize.codebook_used`` (usage statistics) is ignored on load and written on save.
* Backbone: a plain state dict (released ``FlexVARd*-epo*.pth``) or the training layout
  ``{'trainer': {'var_wo_ddp': state_dict}, ...}``; ``module.`` / ``_orig_mod.`` prefixes
  are stripped. ``attn_bias_for_masking`` has a stale, schedule-dependent shape and is
  ignored; ``zero_k_bias`` (always zero) is rebuilt when absent.

Sizes are inferred from the state dicts in ``config.py``; any mismatch between a file and
the model it implies is reported as one :class:`CheckpointError`. Same function shapes as
every family folder: ``read_tokenizer(path) -> sd``, ``read_backbone(path) -> (sd,
layout)``, ``load_into(module, sd, cfg, part, path)``, ``write_tokenizer``,
``write_backbone``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import (assign_state, atomic_save, check_keys, cpu_state, is_safetensors, load_file,
                                    strip_prefix, unwrap_state_dict)

FAMILY = "a FlexVAR (jiaosiyu1999/FlexVAR) checkpoint"
TOKENIZER_IGNORE = ("quantize.codebook_used",)
BACKBONE_IGNORE = ("attn_bias_for_masking", "zero_k_bias")
NESTED = ("trainer", "var_wo_ddp")
TOKENIZER_NESTED = (("model",), ("trainer", "vae_local"), ("vae_local",))
#: ``trainer-weights``: the weights at ``['trainer']['var_wo_ddp']`` as upstream train.py keeps
#: them, without its optimizer state or args: upstream's inference_c2i.py / eval_c2i.py read
#: it, train.py cannot resume from it. ``nested`` is its old name, still accepted when saving.
LAYOUTS = ("plain", "trainer-weights")
OLD_LAYOUT_NAMES = {"nested": "trainer-weights"}


def _clean(sd: dict) -> dict:
    for prefix in ("module.", "_orig_mod.", "module."):
        sd = strip_prefix(sd, prefix)
    return sd


def read_tokenizer(path: str | Path) -> dict:
    obj = load_file(path, what="FlexVAR tokenizer checkpoint")
    sd, _ = unwrap_state_dict(obj, TOKENIZER_NESTED, f"FlexVAR tokenizer {path}")
    sd = _clean(sd)
    _reject_other_families(sd, path, "tokenizer")
    if "quantize.embedding.weight" not in sd or "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{path} is not a FlexVAE (LlamaGen VQModel) tokenizer: it lacks "
                              "'quantize.embedding.weight' / 'encoder.conv_in.weight'")
    return sd


def read_backbone(path: str | Path) -> tuple[dict, str]:
    """-> (state dict, layout 'plain' | 'trainer-weights')."""
    obj = load_file(path, what="FlexVAR backbone checkpoint")
    # ("model",) only so that a tokenizer file given here is recognised and named below
    sd, used = unwrap_state_dict(obj, (NESTED, ("model",)), f"FlexVAR backbone {path}")
    sd = _clean(sd)
    _reject_other_families(sd, path, "backbone")
    needed = ("word_embed.weight", "class_emb.weight", "pos_1LC", "head.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{path} is not a FlexVAR transformer: it lacks {', '.join(missing)}")
    return sd, ("trainer-weights" if used else "plain")


def _reject_other_families(sd: dict, path, role: str) -> None:
    """Name the family of a checkpoint that is clearly not FlexVAR."""
    keys = list(sd)
    var_tok = any(k.startswith(("encoder.down.", "decoder.up.", "quantize.quant_resi")) for k in keys)
    var_bb = any(k.startswith(("lvl_embed.", "lvl_1L")) for k in keys)
    if var_tok or var_bb:
        what = "VAR multi-scale VQVAE tokenizer" if var_tok else "VAR transformer (it has a level embedding)"
        raise CheckpointError(
            f"{path} looks like a {what}, not {FAMILY}; load it with the 'var' family "
            f"(e.g. --family var). The flexvar {role} expects "
            + ("LlamaGen VQModel keys (encoder.conv_blocks.*, quantize.embedding.weight)."
               if role == "tokenizer" else "pos_1LC (1, C, G, G) and no lvl_embed."))
    if role == "backbone" and any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in keys):
        raise CheckpointError(f"{path} is a tokenizer checkpoint, given where the FlexVAR backbone was expected")
    if role == "tokenizer" and any(k.startswith(("blocks.", "word_embed.")) for k in keys):
        raise CheckpointError(f"{path} is a transformer checkpoint, given where the FlexVAE tokenizer was expected")


def load_into(module: torch.nn.Module, sd: dict, cfg, part: str, path) -> None:
    """Strict load of ``sd`` into the tokenizer or backbone ``module`` (``part``), except
    the ignored / rebuilt buffers; one CheckpointError names every mismatch. The module's
    parameters become ``sd``'s tensors (build it under ``params_on_meta``)."""
    (_load_tokenizer if part == "tokenizer" else _load_backbone)(module, sd, path)


def _load_tokenizer(model: torch.nn.Module, sd: dict, path) -> None:
    c = model.cfg
    hint = (f"a FlexVAE tokenizer (LlamaGen VQModel: codebook {c.codebook_size} x {c.codebook_embed_dim}, "
            f"ch {c.ch}, ch_mult {list(c.ch_mult)}, z_channels {c.z_channels}, "
            f"{c.num_res_blocks} res blocks)")
    check_keys(sd, model.state_dict(), f"tokenizer {path}", hint, ignore=TOKENIZER_IGNORE)
    used = sd.get("quantize.codebook_used")
    sd = {k: v for k, v in sd.items() if k not in TOKENIZER_IGNORE}
    assign_state(model, sd, f"tokenizer {path}")
    if isinstance(used, torch.Tensor) and used.shape == model.quantize.codebook_used.shape:
        model.quantize.codebook_used.copy_(used)


def _load_backbone(model: torch.nn.Module, sd: dict, path) -> None:
    c = model.cfg
    hint = (f"a FlexVAR transformer (depth {c.depth}, width {c.embed_dim}, {c.num_heads} heads, "
            f"{c.num_classes} classes, vocab {model.V}, pos grid {c.pos_grid}, "
            f"shared_aln {c.shared_aln})")
    check_keys(sd, model.state_dict(), f"backbone {path}", hint, ignore=BACKBONE_IGNORE)
    sd = {k: v for k, v in sd.items() if not k.endswith(BACKBONE_IGNORE)}
    assign_state(model, sd, f"backbone {path}")


def write_tokenizer(model: torch.nn.Module, path: str | Path) -> None:
    """``{'model': sd}`` as upstream; a ``.safetensors`` path gets the plain state dict."""
    sd = _cpu(model.state_dict())
    atomic_save(sd if is_safetensors(path) else {"model": sd}, path)


def write_backbone(model: torch.nn.Module, path: str | Path, layout: str = "plain",
                   epoch: Optional[int] = None) -> None:
    layout = OLD_LAYOUT_NAMES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown FlexVAR checkpoint layout {layout!r}; choose one of {LAYOUTS}")
    sd = _cpu(model.state_dict())
    if layout == "plain" or is_safetensors(path):  # .safetensors: always the plain state dict
        atomic_save(sd, path)
    else:
        atomic_save({"epoch": int(epoch or 0), "iter": 0, "trainer": {"var_wo_ddp": sd}}, path)


def _cpu(sd: dict) -> dict:
    return cpu_state(sd)
