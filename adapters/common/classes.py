"""Resizing a class embedding whose last row is the null (unconditional) class."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def resize_class_embedding(emb: nn.Embedding, num_classes: int, std: float) -> nn.Embedding:
    """(K + 1, C) -> (num_classes + 1, C): rows of kept classes copied, new class rows drawn
    from a truncated normal of ``std`` (the family's own init), the null row kept last."""
    if num_classes < 1:
        raise ValueError(f"a class-conditional model needs at least one class, got {num_classes}")
    old = emb.weight
    k = old.shape[0] - 1
    new = nn.Embedding(num_classes + 1, old.shape[1], device=old.device, dtype=old.dtype)
    nn.init.trunc_normal_(new.weight, std=std)
    keep = min(k, num_classes)
    new.weight[:keep] = old[:keep]
    new.weight[num_classes] = old[k]
    new.weight.requires_grad_(old.requires_grad)
    return new
