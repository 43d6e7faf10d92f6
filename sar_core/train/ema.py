"""Exponential moving average of the backbone's trainable weights.

``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step, kept in
float32 on the parameter's device (sharded like the parameter under FSDP2: a DTensor
shadow follows a DTensor parameter). ``state_dict`` holds full tensors, so a checkpoint
does not depend on the number of ranks. Buffers are not averaged: :meth:`swap_into`
only exchanges parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``ref`` (sharded when ``ref`` is a DTensor)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)
    return full.to(ref.device, ref.dtype)


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.reset(model)

    def reset(self, model: nn.Module) -> None:
        """Start the average afresh from ``model``'s current weights."""
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: _full(t).detach().cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        for n, ref in self.shadow.items():
            self.shadow[n] = _like(state["shadow"][n].float(), ref)

    @contextmanager
    @torch.no_grad()
    def swap_into(self, model: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``model`` (e.g. to export them)."""
        saved = {}
        for n, p in model.named_parameters():
            if n in self.shadow:
                saved[n] = p.detach().clone()
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
