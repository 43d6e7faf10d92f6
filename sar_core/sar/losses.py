"""Losses of a SAR step.

* :func:`teacher_forcing_loss`: the loss upstream pre-trains with: per-token cross-entropy
  against ground truth (index CE or per-bit CE), optional label smoothing, weight 1/L per
  token, summed over tokens, averaged over the batch (= the mean over tokens).
* Contrastive student-forcing losses (CSFL), registered by name and chosen by config:
  ``hard`` CE against the teacher-forced pass's own predicted codes (the official code),
  ``soft`` KL to the detached teacher-forced distribution at a temperature, and ``naive``
  CE of the student-forced logits against ground truth (the paper's failing ablation).

Each CSF loss receives a :class:`~sar_core.sar.rollouts.StudentPass` and returns the
per-token loss (B, n); the step averages it over the supervised tokens. The built-in
losses go through :func:`~sar_core.sar.rollouts.supervised_loss`, which computes over the
pass's whole contiguous logits when it has them (no copy of a sliced (B, n, V) view).
"""

from __future__ import annotations

from typing import ClassVar, Optional

import torch

from sar_core.sar.rollouts import supervised_loss
from sar_core.tokens import token_ce, token_kl


def teacher_forcing_loss(logits: torch.Tensor, target: torch.Tensor, bits: Optional[int],
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token loss of (B, L, V) logits against (B, L[, d]) ground-truth codes."""
    return token_ce(logits, target, bits, label_smoothing).mean()


class CSFLoss:
    """Base class: ``loss(student_pass, bits, label_smoothing) -> (B, n)`` per-token loss."""

    name: ClassVar[str] = ""

    def __init__(self, **options):
        if options:
            raise TypeError(f"loss '{self.name}' takes no options, got {sorted(options)}")

    def __call__(self, sp, bits: Optional[int], label_smoothing: float = 0.0) -> torch.Tensor:
        raise NotImplementedError


class HardCSFL(CSFLoss):
    """CE of student-forced logits against the teacher-forced predicted codes (detached)."""

    name = "hard"

    def __call__(self, sp, bits, label_smoothing=0.0):
        return supervised_loss(sp, lambda lg, tg: token_ce(lg, tg, bits, label_smoothing),
                               sp.teacher_codes.detach())


class SoftCSFL(CSFLoss):
    """KL(teacher || student) per token against the detached teacher-forced distribution."""

    name = "soft"

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"soft CSFL temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def __call__(self, sp, bits, label_smoothing=0.0):
        return supervised_loss(sp, lambda lg, tg: token_kl(lg, tg, bits, self.temperature),
                               sp.teacher_logits.detach(), teacher=True)


class NaiveStudentForcing(CSFLoss):
    """CE of student-forced logits against ground truth (ablation: expected to hurt)."""

    name = "naive"

    def __call__(self, sp, bits, label_smoothing=0.0):
        return supervised_loss(sp, lambda lg, tg: token_ce(lg, tg, bits, label_smoothing), sp.gt_codes)


BUILTIN_LOSSES = {cls.name: cls for cls in (HardCSFL, SoftCSFL, NaiveStudentForcing)}
