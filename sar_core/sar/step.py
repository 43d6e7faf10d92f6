"""One SAR step, family-agnostic: teacher-forced pass, rollout, student-forced pass.

    gt codes -> teacher inputs -> model (pass 1) -> L_TF  [backward now: frees pass 1]
             -> rollout predictions (detached, sampled after pass 1 is freed)
             -> stagger inputs -> model (pass 2)
             -> L_CSF against detached teacher targets -> backward(gamma * L_CSF)

``L = L_TF + gamma * L_CSF``; with several student passes (``ssr`` depth d > 1) L_CSF is
the mean of their losses and each pass back-propagates its share before the next runs. With ``backward`` given, the TF loss is back-propagated
before the student pass is even built, so the step's peak memory stays close to a plain
teacher-forcing step; gradients equal those of the single-backward form because the
student pass only reads detached tensors of pass 1. With ``backward=None`` nothing is
back-propagated and ``StepResult.total`` keeps its graph (single-backward form).

Guided rollouts run the null-condition rows as a separate forward without gradients
(they only steer the detached rollout) and only the scales the student pass reads are
predicted; ``upstream_exact=True`` keeps upstream's single 2B-row pass and its draws.
``ssr`` with ``scales='last'`` on a block-causal family that reuses prefixes records pass
1's prefix keys / values and runs pass 2 over the last scale only; the step then does ONE
backward of ``L_TF + gamma * L_CSF`` (the CSF gradient flows through the prefix into pass
1), so pass 1's activations stay alive during the (short) pass 2. A within-scale family
(``adapter.attention``) has no prefix to read: its one-scale pass 2 is independent of pass
1, so nothing is recorded and the two memory-lean backwards stay.

``model`` is the (possibly DDP/FSDP-wrapped) backbone: ``model(cond, inputs, schedule,
student_forcing=False) -> logits``. Under DDP the official rollout leaves some parameters
unused in pass 2 (e.g. the start position): wrap with ``find_unused_parameters=True`` or
run pass 1's backward under ``no_sync``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from sar_core.sar.losses import CSFLoss, teacher_forcing_loss
from sar_core.sar.prefix_cache import PrefixKV
from sar_core.sar.rollouts import Rollout, StudentPass
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes

Backward = Callable[[torch.Tensor], None]


@dataclass
class StepResult:
    loss_tf: torch.Tensor            # scalar; detached when backward was run
    loss_csf: torch.Tensor           # scalar (0 when the rollout has no student pass)
    total: torch.Tensor              # loss_tf + gamma * loss_csf
    tf_logits: torch.Tensor          # detached teacher-forced logits, conditional rows (B, L, V)
    pred_codes: Optional[list]       # rollout predictions per scale (None for 'none')
    student: Optional[StudentPass]   # the (first) student pass
    tf_cond_rows: int                # rows of pass 1 (B, or 2B with guided sampling)
    students: list = field(default_factory=list)  # every student pass (several with ssr depth > 1)


def sar_step(adapter, model, cond: Any, gt_codes: list, schedule: Schedule, rollout: Rollout,
             csf_loss: Optional[CSFLoss], gamma: float = 0.01, label_smoothing: float = 0.0,
             generator: Optional[torch.Generator] = None, rng: Optional[random.Random] = None,
             backward: Optional[Backward] = None, inputs: Optional[torch.Tensor] = None) -> StepResult:
    """Run one SAR step on a batch of ground-truth codes. See the module docstring.

    ``generator`` drives rollout sampling; ``rng`` draws the random transition of
    ``ssr`` with ``scales='random'``; ``inputs`` may pass precomputed teacher inputs.
    """
    bits = adapter.bits_per_token
    rng = rng or random.Random(0)
    B = gt_codes[0].shape[0]
    if inputs is None:
        with torch.no_grad():
            inputs = adapter.teacher_inputs(gt_codes, schedule)
    want_student = rollout.active and csf_loss is not None
    n_prefix = rollout.prefix_length(adapter, schedule) if want_student else None
    cache = PrefixKV(n_prefix) if n_prefix else None
    logits_tf, uncond = _teacher_pass(adapter, model, cond, inputs, schedule, rollout, cache)
    loss_tf = teacher_forcing_loss(logits_tf, cat_codes(gt_codes), bits, label_smoothing)
    teacher = logits_tf.detach()
    del logits_tf
    if backward is not None and cache is None:  # frees pass 1 before the rollout and pass 2
        backward(loss_tf)
        loss_tf = loss_tf.detach()
    pred = None
    if rollout.active:
        with torch.no_grad():
            needed = rollout.needed_scales(schedule)
            extra = {} if needed is None else {"scales": needed}
            pred = rollout.predict(adapter, teacher, uncond, schedule, generator, **extra)
    del uncond

    sp = None
    loss_csf = torch.zeros((), device=teacher.device)
    if want_student and rollout.passes(schedule) > 1:
        sps, loss_csf = _deeper_passes(adapter, model, cond, gt_codes, pred, schedule, teacher, rng, generator,
                                       rollout, csf_loss, bits, gamma, label_smoothing, backward)
        return StepResult(loss_tf, loss_csf, loss_tf + gamma * loss_csf, teacher, pred, sps[0],
                          int(B * (2 if rollout.uses_cfg else 1)), sps)
    if want_student:
        extra = {"prefix": cache} if cache is not None else {}
        sp = rollout.student(adapter, model, cond, gt_codes, pred, schedule, teacher, rng, **extra)
        if sp is not None:
            loss_csf = csf_loss(sp, bits, label_smoothing).mean()
    if backward is not None:
        if cache is not None:  # one backward over both passes (pass 2 reads pass 1's prefix K/V)
            backward(loss_tf + gamma * loss_csf if sp is not None else loss_tf)
            loss_tf = loss_tf.detach()
        elif sp is not None:
            backward(gamma * loss_csf)
        loss_csf = loss_csf.detach()
        if sp is not None:
            sp.detach()
    total = loss_tf + gamma * loss_csf
    return StepResult(loss_tf, loss_csf, total, teacher, pred, sp, int(B * (2 if rollout.uses_cfg else 1)),
                      [sp] if sp is not None else [])


def _deeper_passes(adapter, model, cond, gt_codes, pred, schedule, teacher, rng, generator, rollout, csf_loss,
                   bits, gamma, label_smoothing, backward):
    """Several student passes (``rollout.student_passes``): L_CSF is the mean of their
    losses; with ``backward`` each pass back-propagates gamma * its share before the next
    runs (the passes read only detached tensors of each other), so one pass's activations
    are alive at a time. Returns (passes, L_CSF)."""
    n = rollout.passes(schedule)
    sps, parts = [], []
    for sp in rollout.student_passes(adapter, model, cond, gt_codes, pred, schedule, teacher, rng, generator):
        part = csf_loss(sp, bits, label_smoothing).mean() / n
        if backward is not None:
            backward(gamma * part)
            part = part.detach()
            sp.detach()
        sps.append(sp)
        parts.append(part)
    if len(sps) != n:
        raise RuntimeError(f"rollout '{rollout.name}' ran {len(sps)} student passes, promised {n}")
    return sps, torch.stack(parts).sum()


def _teacher_pass(adapter, model, cond, inputs, schedule, rollout, cache):
    """Pass 1: conditional logits with gradients, and the null-condition logits a guided
    rollout needs (detached): a separate no-grad forward, or upstream's 2B-row pass
    (``rollout.joint_cfg``)."""
    kw = {"prefix": cache.record()} if cache is not None else {}
    if not rollout.uses_cfg:
        return model(cond, inputs, schedule, **kw), None
    if rollout.joint_cfg:
        logits_all = model(adapter.cfg_condition(cond), torch.cat([inputs, inputs], dim=0), schedule)
        B = inputs.shape[0]
        return logits_all[:B], logits_all[B:].detach()
    logits = model(cond, inputs, schedule, **kw)
    with torch.no_grad():
        uncond = model(adapter.null_condition(cond), inputs, schedule)
    return logits, uncond
