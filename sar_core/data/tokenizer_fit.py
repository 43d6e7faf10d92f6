"""Fit a family's tokenizer from scratch (the first half of ``sar pretrain``).

Uses only ``adapter.tokenizer_training_loss(images, schedule)``; the family decides the
loss (reconstruction + codebook + commitment terms). Adam, a short warm-up, a progress
bar, and a codebook-usage report at the end so a dead codebook is visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from sar_core.schedule import Schedule


@dataclass
class TokenizerFitResult:
    steps: int
    final_loss: float
    val_recon_mse: float
    codes_used_last_scale: int
    history: list


def _cycle(loader):
    while True:
        yield from loader


@torch.no_grad()
def reconstruction_mse(adapter, loader, schedule: Schedule, max_batches: int = 8) -> tuple[float, int]:
    """Mean squared error of decode(encode(x)) in [-1, 1], and distinct codes at the last scale."""
    adapter.tokenizer.eval()
    total, n, used = 0.0, 0, set()
    for i, (images, _) in enumerate(loader):
        if i >= max_batches:
            break
        images = images.to(adapter.device)
        codes = adapter.encode(images, schedule)
        recon = adapter.decode(codes, schedule)
        total += torch.mean((recon - images) ** 2).item() * images.shape[0]
        n += images.shape[0]
        last = codes[-1]
        if last.dim() == 3:  # bitwise codes (B, l, bits): a code is a row of bits
            used.update(map(tuple, last.reshape(-1, last.shape[-1]).tolist()))
        else:
            used.update(last.unique().tolist())
    return total / max(n, 1), len(used)


def fit_tokenizer(adapter, train_set, val_set, schedule: Schedule, steps: int = 2000,
                  batch_size: int = 64, lr: float = 2e-3, seed: int = 0, progress=None) -> TokenizerFitResult:
    """Train ``adapter.tokenizer`` in place; returns a summary. ``progress`` is an optional
    ``rich.progress.Progress``."""
    torch.manual_seed(seed)
    tok = adapter.tokenizer
    tok.train().requires_grad_(True)
    opt = torch.optim.Adam(tok.parameters(), lr=lr, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    task = progress.add_task("fit tokenizer", total=steps) if progress else None
    history, loss = [], torch.tensor(float("nan"))
    for step, (images, _) in zip(range(steps), _cycle(loader)):
        images = images.to(adapter.device)
        loss, stats = adapter.tokenizer_training_loss(images, schedule)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append({"step": step, "loss": loss.item(), **stats})
        if progress:
            progress.update(task, advance=1, description=f"fit tokenizer  loss {loss.item():.4f}")
    tok.eval().requires_grad_(False)
    val_loader = DataLoader(val_set, batch_size=batch_size)
    mse, used = reconstruction_mse(adapter, val_loader, schedule)
    return TokenizerFitResult(steps, loss.item(), mse, used, history)
