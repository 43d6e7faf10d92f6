"""Per-block activation checkpointing: trade recomputation for activation memory.

Modes (``train.activation_checkpointing``):

* ``none``: autograd keeps every block's intermediate tensors (fastest, most memory).
* ``full``: each transformer block keeps only its inputs; its forward is re-run during
  backward (about one extra forward of the blocks per step).
* ``selective``: inside each block the outputs of matrix products and attention are kept
  and only the cheap ops (norms, modulation, activations, residual adds) are recomputed:
  most of ``full``'s savings at a fraction of its extra compute.

The blocks come from the adapter contract (:meth:`ScaleWiseAdapter.transformer_blocks`),
so a family only lists them. Checkpointing is non-reentrant (``use_reentrant=False``),
which composes with DDP (with or without ``find_unused_parameters``), FSDP2
(``fully_shard`` hooks run outside the checkpointed forward) and ``torch.compile``; RNG
state is replayed so dropout / drop-path draw the same masks when recomputed. Under
``torch.no_grad()`` (samplers, evaluation) a block runs plainly. Parameter names and
state dicts are unchanged (the block's ``forward`` is wrapped in place, not the module).
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
#: ops whose outputs ``selective`` keeps (everything else is recomputed)
SAVED_OPS = frozenset((
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
))


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def _checkpointed(forward, mode: str, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # tensors kept by ``selective`` go through enclosing saved-tensor hooks (e.g. save_on_cpu)
    extra = {"context_fn": _selective_context, "respect_saved_tensors_hooks": True} if mode == "selective" else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def checkpoint_mode(block: nn.Module) -> str:
    return block.__dict__.get("_sar_ckpt_mode", "none")


def apply_activation_checkpointing(blocks: Sequence[nn.Module], mode: str) -> int:
    """Checkpoint every block of ``blocks`` in ``mode`` (``none`` undoes it).

    Returns the number of blocks now checkpointed. Call it before wrapping the model in
    DDP / FSDP2 / ``torch.compile``."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    blocks = list(blocks)
    if mode != "none" and not blocks:
        raise ValueError("this family lists no transformer blocks (adapter.transformer_blocks()), "
                         "so activation checkpointing is unavailable; use 'none'")
    if any("_sar_eager_forward" in b.__dict__ for b in blocks):  # sar_core.train.compiling
        raise ValueError("the blocks are compiled already: apply activation checkpointing before torch.compile")
    for block in blocks:
        block.__dict__.pop("forward", None)  # back to the class's forward
        block.__dict__.pop("_sar_ckpt_mode", None)
        if mode != "none":
            block.forward = functools.partial(_checkpointed, type(block).forward.__get__(block), mode)
            block.__dict__["_sar_ckpt_mode"] = mode
    return 0 if mode == "none" else len(blocks)
