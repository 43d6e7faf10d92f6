"""Reading and writing VAR checkpoints in upstream layouts.

The tokenizer half (``read_tokenizer``, ``load_into(..., "tokenizer", ...)``,
``write_tokenizer``) is reusable by other families that ship VAR's VQVAE (docs/plugins.md):
its messages name the file layout ("VAR's VQVAE layout"), never the family being run.

Tokenizer: a plain VQVAE state dict (``vae_ch160v4096z32.pth``), or nested under
``['trainer']['vae_local']`` of a training checkpoint. Backbone: a plain VAR state dict
(``var_d16.pth``, with buffers) or a training checkpoint ``{'trainer': {'var_wo_ddp': sd,
...}, 'epoch': ...}`` (read as layout ``trainer-weights``). ``module.`` / ``_orig_mod.``
prefixes are stripped.

Buffers rebuilt from the schedule (``lvl_1L``, ``attn_bias_for_masking``,
``*.zero_k_bias``) and the VQ statistics ``quantize.ema_vocab_hit_SV`` are never compared;
every other missing, unexpected or mis-shaped key is reported in one CheckpointError.
Files written back hold every buffer upstream's strict ``load_state_dict`` expects.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import (assign_state, atomic_save, check_keys, cpu_state, is_safetensors, load_file,
                                    strip_prefix, unwrap_state_dict)

from .config import VARConfig

BACKBONE_NESTED = (("trainer", "var_wo_ddp"), ("var_wo_ddp",), ("model",), ("state_dict",))
TOKENIZER_NESTED = (("trainer", "vae_local"), ("vae_local",), ("model",), ("state_dict",), ("vae",))
BACKBONE_REBUILT = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")
TOKENIZER_IGNORED = ("quantize.ema_vocab_hit_SV",)
LAYOUTS = ("plain", "trainer-weights")
#: the old name of ``trainer-weights``, still accepted when saving
OLD_LAYOUT_NAMES = {"nested": "trainer-weights"}
TOKENIZER_FILE = "tokenizer checkpoint (VAR's VQVAE layout)"


def _strip(sd: dict) -> dict:
    for _ in range(2):  # DDP and torch.compile wrappers, in either order
        for prefix in ("module.", "_orig_mod."):
            sd = strip_prefix(sd, prefix)
    return sd


def _tensors_only(sd: dict, what: str, path: Path) -> dict:
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what} {path}: entries that are not tensors: {', '.join(map(str, bad[:8]))}")
    return sd


def _family_guess(sd: dict) -> Optional[str]:
    """Describe another family whose checkpoint this looks like, or None."""
    pos = sd.get("pos_1LC")
    if isinstance(pos, torch.Tensor) and pos.ndim == 4 and "lvl_embed.weight" not in sd:
        return ("a FlexVAR transformer checkpoint (pos_1LC is a 2-D position grid "
                f"{tuple(pos.shape)} and there is no lvl_embed; the 'flexvar' adapter reads it)")
    if any(k.startswith(("encoder.conv_blocks.", "decoder.conv_blocks.")) for k in sd) or "quantize.codebook_used" in sd:
        return ("a FlexVAR / LlamaGen VQModel tokenizer checkpoint (encoder.conv_blocks.*, "
                "quantize.codebook_used; the 'flexvar' adapter reads it)")
    if any(k.startswith(("block_chunks.", "text_norm.", "text_proj_for_sos.")) for k in sd) or "cfg_uncond" in sd:
        return "an Infinity transformer checkpoint (text-conditioned, bitwise; the 'infinity' adapter reads it)"
    if "quantizer.lfq.mask" in sd or "encoder.conv_in.conv.weight" in sd:
        return "an Infinity BSQ tokenizer checkpoint (the 'infinity' adapter reads it)"
    return None


def read_tokenizer(path: str | Path) -> dict:
    """-> state dict (plain, or nested in a training checkpoint)."""
    p = path  # a file or an hf:// reference (load_file resolves it)
    obj = load_file(p, what=TOKENIZER_FILE)
    sd, used = unwrap_state_dict(obj, TOKENIZER_NESTED, f"{TOKENIZER_FILE} {p}")
    sd = _strip(_tensors_only(sd, TOKENIZER_FILE, p))
    other = _family_guess(sd)
    if "pos_1LC" in sd and "quantize.embedding.weight" not in sd:
        raise CheckpointError(f"{p} is a transformer (backbone) checkpoint, not a tokenizer in VAR's VQVAE "
                              "layout; swap the tokenizer and backbone paths")
    if other:
        raise CheckpointError(f"{p} looks like {other}, not a multi-scale VQVAE tokenizer in VAR's layout "
                              "(expected keys encoder.down.*, quantize.embedding.weight, quantize.quant_resi.*)")
    need = ("quantize.embedding.weight", "encoder.conv_in.weight", "quant_conv.weight", "encoder.down.0.block.0.conv2.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{p} is not a tokenizer in VAR's VQVAE layout: missing {', '.join(missing)}")
    return sd


def read_backbone(path: str | Path) -> tuple[dict, str]:
    """-> (state dict, layout 'plain' | 'trainer-weights')."""
    p = path  # a file or an hf:// reference (load_file resolves it)
    obj = load_file(p, what="VAR backbone checkpoint")
    sd, used = unwrap_state_dict(obj, BACKBONE_NESTED, f"VAR backbone checkpoint {p}")
    sd = _strip(_tensors_only(sd, "VAR backbone checkpoint", p))
    other = _family_guess(sd)
    if other:
        raise CheckpointError(f"{p} looks like {other}, not a VAR transformer "
                              "(expected pos_1LC of shape (1, L, C) and lvl_embed.weight)")
    if "quantize.embedding.weight" in sd and "pos_1LC" not in sd:
        raise CheckpointError(f"{p} is a tokenizer checkpoint, not a VAR transformer; "
                              "swap the tokenizer and backbone paths")
    need = ("pos_1LC", "pos_start", "lvl_embed.weight", "word_embed.weight", "class_emb.weight", "head.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{p} is not a VAR transformer checkpoint: missing {', '.join(missing)}")
    if sd["pos_1LC"].ndim != 3:
        raise CheckpointError(f"{p}: pos_1LC has shape {tuple(sd['pos_1LC'].shape)}, VAR expects (1, L, C)")
    return sd, ("trainer-weights" if used else "plain")


def _size_hint(cfg: VARConfig, part: str) -> str:
    if part == "tokenizer":
        return (f"a VQVAE in VAR's layout with vocab {cfg.vocab_size}, Cvae {cfg.Cvae}, ch {cfg.ch}, ch_mult "
                f"{list(cfg.ch_mult)}, {cfg.num_res_blocks} res blocks, {cfg.num_phi} phi convs")
    return (f"a VAR transformer of depth {cfg.depth}, width {cfg.embed_dim}, {cfg.num_heads} heads, "
            f"patch_nums {list(cfg.patch_nums)}, {cfg.num_classes} classes, vocab {cfg.vocab_size}"
            f"{', shared AdaLN' if cfg.shared_aln else ''}")


def load_into(module: nn.Module, sd: dict, cfg: VARConfig, part: str, path: str | Path) -> None:
    """Strict load of ``sd`` into ``module`` except the rebuilt / ignored buffers; the
    module's parameters become ``sd``'s tensors (build it under ``params_on_meta``)."""
    ignore = BACKBONE_REBUILT if part == "backbone" else TOKENIZER_IGNORED
    expected = module.state_dict()
    what = f"{TOKENIZER_FILE} {path}" if part == "tokenizer" else f"VAR backbone checkpoint {path}"
    check_keys(sd, expected, what, _size_hint(cfg, part), ignore=ignore)
    keep = {k: v for k, v in sd.items() if not any(k == i or k.endswith(i) for i in ignore)}
    assign_state(module, keep, what)
    if part == "tokenizer" and "quantize.ema_vocab_hit_SV" in sd:
        # keep the file's statistics (any shape) so saving reproduces them
        module.quantize.ema_vocab_hit_SV = sd["quantize.ema_vocab_hit_SV"].clone()


def _plain(module: nn.Module) -> OrderedDict:
    return OrderedDict(cpu_state(module.state_dict()))


def write_tokenizer(tokenizer: nn.Module, path: str | Path) -> None:
    """A plain state dict, as upstream releases it (atomic)."""
    atomic_save(_plain(tokenizer), path)


def write_backbone(backbone: nn.Module, path: str | Path, layout: str = "plain",
                   tokenizer: Optional[nn.Module] = None, extra: Optional[dict] = None) -> None:
    """Write the backbone in an upstream layout, atomically.

    ``plain``: a bare state dict, the released ``var_d16.pth`` layout (always, for a
    ``.safetensors`` path). ``trainer-weights``: the weights where upstream train.py's
    checkpoints keep them, ``{'epoch', 'iter', 'trainer': {'var_wo_ddp', 'vae_local',
    'config'}}``, but not a train.py checkpoint: no optimizer state (``var_opt``) and no
    ``args``. Upstream's evaluation and inference code, which takes
    ``['trainer']['var_wo_ddp']``, reads it; upstream train.py cannot resume from it.
    ``nested`` is its old name.
    """
    layout = OLD_LAYOUT_NAMES.get(layout, layout)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAR checkpoint layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    sd = _plain(backbone)
    if layout == "plain" or is_safetensors(path):  # .safetensors: always the plain state dict
        atomic_save(sd, path)
        return
    extra = dict(extra or {})
    trainer = {"var_wo_ddp": sd, "config": dict(extra.pop("config", {}))}
    if tokenizer is not None:
        trainer["vae_local"] = _plain(tokenizer)
    atomic_save({"epoch": int(extra.pop("epoch", 0)), "iter": int(extra.pop("iter", 0)),
                 "trainer": trainer, **extra}, path)
