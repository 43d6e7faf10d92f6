"""AdamW with upstream's weight-decay rule, and the learning-rate schedule.

Weight decay applies to weight matrices only: parameters that are 1-D (norm scales,
biases, ...), named ``*.bias``, or whose name contains one of the adapter's
``no_decay_keywords`` (positions, level embeddings, start tokens ...) get none.

Learning rate at optimizer step ``s`` (0-based) of ``total``: a linear warm-up from
``warmup_start * lr`` to ``lr`` over ``warmup_steps``; then ``constant``, or after an
optional hold at the peak (``hold_fraction`` of the remaining steps; upstream ``lin0``
holds 5 %) a ``linear`` or ``cosine`` decay that reaches ``lr_end`` at the last step.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from sar_core.train.config import OptimConfig


def no_decay(name: str, param: torch.Tensor, keywords: Iterable[str]) -> bool:
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)


def param_groups(model: nn.Module, weight_decay: float, keywords: Iterable[str]) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else (trainable params only)."""
    keywords = tuple(keywords)
    decay, rest = [], []
    decay_names, rest_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay(name, p, keywords):
            rest.append(p)
            rest_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay, "names": decay_names},
              {"params": rest, "weight_decay": 0.0, "names": rest_names}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, keywords: Iterable[str],
                    device: torch.device | None = None) -> torch.optim.AdamW:
    if cfg.lr is None:  # a bare OptimConfig: only RunConfig knows the batch its default follows
        raise ValueError("optim.lr is unset: pass lr, or build the whole RunConfig (its default lr follows "
                         "train.batch_size)")
    groups = param_groups(model, cfg.weight_decay, keywords)
    for g in groups:
        g.pop("names")
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``."""
    peak = cfg.lr
    wp = min(cfg.warmup_steps, total)
    if step < wp:
        return peak * (cfg.warmup_start + (1 - cfg.warmup_start) * step / wp)
    kind = cfg.schedule_kind
    if kind == "constant":
        return peak
    end = cfg.lr_end if cfg.lr_end is not None else 0.0
    span = max(total - wp, 1)
    hold = int(round(cfg.hold_fraction * span))
    decay_len = span - hold - 1
    t = step - wp - hold
    if t <= 0:
        return peak
    frac = min(t / decay_len, 1.0) if decay_len > 0 else 1.0
    if kind == "linear":
        return peak + (end - peak) * frac
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
