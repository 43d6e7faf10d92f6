"""Class conditions of the class-conditional families (VAR, FlexVAR)."""

from __future__ import annotations

import torch


def drop_labels(label_B: torch.Tensor, rate: float, null_class: int) -> torch.Tensor:
    """Class dropout: each label becomes ``null_class`` with probability ``rate`` (in train
    and eval mode, as upstream). Rate 0 draws no random numbers."""
    if rate <= 0:
        return label_B
    drop = torch.rand(label_B.shape[0], device=label_B.device) < rate
    return torch.where(drop, torch.full_like(label_B, null_class), label_B)
