"""Rollout strategies: how the student-forced pass of a SAR step is built.

A rollout turns the detached teacher-forced logits into predicted codes at every scale
(argmax, or top-k / top-p sampling, optionally classifier-free guided), then builds and
runs the student-forced pass through the adapter contract only:

* ``ssr`` (the paper's Stagger-Scale Rollout): for each chosen scale k the input of scale
  k+1 becomes what the model's own sampler would feed after predicting k on top of ground
  truth below k (``adapter.stagger_inputs``); ONE forward over the whole shifted sequence;
  the student-forced logits of every shifted scale are supervised. ``scales``: ``all``
  (every transition, default), ``last`` (the last transition only) or ``random`` (one
  transition drawn per step).
  ``depth`` d (default 1, the paper's one stagger step; d > 1 needs ``scales='all'`` and d
  below the number of scales K): d student passes after pass 1. Pass 1 is teacher forcing;
  its detached predictions P1[s] (by the rollout's sampling: argmax, sampled or guided)
  exist at every scale. Pass j (j = 2 .. d+1) feeds scale s >= j-1 what the model's own
  sampler would feed there after j-1 of its own steps on top of ground truth: the code
  history gt[0 .. s-j], P1[s-j+1], P2[s-j+2], ..., P_{j-1}[s-1] (P_i: pass i's detached
  predictions, drawn the same way; a guided rollout runs a no-grad null-condition forward
  of every pass but the last), built by ``adapter.teacher_inputs`` on
  ``adapter.mix_codes(gt, {t: P_i[t]})`` per scale (the input of a scale reads only codes
  below it: a contract check). Scales s < j-1 keep their teacher-forcing inputs and are
  not supervised in pass j. Every pass j >= 2 is ONE forward over the whole sequence with
  gradients, supervised at scales j-1 .. K-1 against pass 1's detached targets (teacher
  logits / predictions / ground truth at the same scale); the step's CSF loss is the mean
  of the passes' losses (so gamma keeps its meaning) and back-propagates each pass right
  after it ran (:meth:`Rollout.student_passes`). A drawn schedule of K <= d scales runs
  K-1 passes. d = 1 is exactly the single pass above.
* ``official``: the official SAR code's variant: one student-forced pass on the last
  transition only, whose context is just the start token (without its start position),
  i.e. a two-scale sequence [start, last scale] (``student_forcing=True``).
* ``none``: plain teacher forcing (the control arm); no second pass.

Guided sampling asks the adapter (``adapter.guide_logits``) how to guide at scale i of n;
the default is the official trainer's ramp t_i = cfg * 0.5 * (1 + i / (n - 1)) and
logits = (1 + t) * cond - t * uncond. The null-condition rows only steer the detached
rollout, so by default they run as a separate forward without gradients, and a rollout
samples only the scales its student pass reads (``needed_scales``), among the top-k
candidates only (``sampling.sample_candidates``: the same distribution). With
``upstream_exact=True`` the teacher pass runs on 2B rows (condition, then null
condition) with gradients and every scale is sampled, exactly as the official trainer
(same batching, same dropout and sampling draws): the conformance kit's path.

Cost notes: the student pass keeps its logits whole (``StudentPass.full``) so CSF losses
run over one contiguous tensor (no copy of the logits, no zero-filled gradient); ``ssr``
with ``scales='last'`` on a family with :attr:`~sar_core.adapter.ScaleWiseAdapter.reuses_prefix`
runs pass 2 over the last scale only, on pass 1's prefix keys / values; on a within-scale
family (:attr:`~sar_core.adapter.ScaleWiseAdapter.attention`) every ``ssr`` pass that
changes one scale (``last``, ``random``) runs over [scale 0, that scale] only, reading
nothing of pass 1 (:mod:`sar_core.sar.prefix_cache`; ``reuse_prefix=False`` runs the full
pass in both cases).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Optional, Sequence

import torch

from sar_core.sar.prefix_cache import scale_alone, scales_alone
from sar_core.sar.sampling import sample_candidates, sample_logits
from sar_core.schedule import Schedule
from sar_core.tokens import group_logits, token_argmax, ungroup_codes


@dataclass
class StudentPass:
    """What the student-forced pass produced, at the supervised tokens only.

    ``full`` (optional) is the whole contiguous logits tensor of pass 2, of which
    ``logits`` is the view ``full[:, start:start + n]``; losses then compute over ``full``
    and keep their per-token values at the supervised tokens (see
    :func:`supervised_loss`). ``teacher_full`` is the teacher logits in the same layout
    when pass 2 ran over the step's schedule.
    """

    schedule: Schedule            # the schedule pass 2 ran with
    inputs: torch.Tensor          # the inputs pass 2 saw, (B, L2 - first_len, C_in)
    logits: torch.Tensor          # student logits at supervised tokens (B, n, V)
    teacher_logits: torch.Tensor  # detached teacher-forced logits there (B, n, V)
    teacher_codes: torch.Tensor   # rollout's teacher predictions there (B, n[, d])
    gt_codes: torch.Tensor        # ground truth there (B, n[, d])
    scales: tuple[int, ...]       # scale indices (in the step's schedule) student-forced
    extras: dict = field(default_factory=dict)
    full: Optional[torch.Tensor] = None          # (B, L2, V) with logits = full[:, start:start+n]
    start: int = 0
    teacher_full: Optional[torch.Tensor] = None  # detached (B, L2, V), same layout as full

    def detach(self) -> None:
        self.logits, self.full = self.logits.detach(), None


def _pad_tokens(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(B, n, ...) -> (B, length, ...) with x at tokens start..start+n, zeros elsewhere."""
    out = x.new_zeros((x.shape[0], length) + tuple(x.shape[2:]))
    out[:, start:start + x.shape[1]] = x
    return out


def supervised_loss(sp: StudentPass, fn, target: torch.Tensor, teacher: bool = False) -> torch.Tensor:
    """``fn(logits, target) -> (B, n)`` at the supervised tokens of ``sp``.

    With ``sp.full`` the loss runs over the contiguous full logits against a zero-padded
    target (``teacher=True``: the target is teacher logits, taken from ``sp.teacher_full``
    when present) and is then cut to the supervised tokens: per-token values and
    gradients equal those of ``fn(sp.logits, target)``, without copying the logits."""
    if sp.full is None:
        return fn(sp.logits, target)
    n, L2 = sp.logits.shape[1], sp.full.shape[1]
    if teacher and sp.teacher_full is not None:
        padded = sp.teacher_full
    else:
        padded = _pad_tokens(target, sp.start, L2)
    return fn(sp.full, padded)[:, sp.start:sp.start + n]


class Rollout:
    """Base rollout. Subclasses implement :meth:`student`.

    Options: ``sampling`` ('argmax' | 'sample'), ``top_k``, ``top_p``, ``cfg`` (guidance
    scale; > 1 with sampling enables guidance), ``scales`` (ssr only).
    """

    name: ClassVar[str] = ""
    active: ClassVar[bool] = True
    #: True when pass 2 leaves some backbone parameters unused (DDP then needs
    #: ``find_unused_parameters``); the official short pass skips the start position.
    skips_parameters: ClassVar[bool] = False

    def __init__(self, sampling: str = "argmax", top_k: int = 0, top_p: float = 0.0,
                 cfg: float = 1.0, scales: str = "all", upstream_exact: bool = False):
        self.upstream_exact = bool(upstream_exact)
        if sampling not in ("argmax", "sample"):
            raise ValueError(f"rollout sampling must be 'argmax' or 'sample', got {sampling!r}")
        if scales not in ("all", "last", "random"):
            raise ValueError(f"rollout scales must be 'all', 'last' or 'random', got {scales!r}")
        self.sampling, self.top_k, self.top_p = sampling, int(top_k), float(top_p)
        self.cfg, self.scales = float(cfg), scales

    @property
    def uses_cfg(self) -> bool:
        """True when the teacher pass must run on cond + null rows (guided sampling)."""
        return self.active and self.sampling == "sample" and self.cfg > 1

    @property
    def joint_cfg(self) -> bool:
        """True when the guided teacher pass runs on 2B rows with gradients (upstream)."""
        return self.uses_cfg and self.upstream_exact

    def needed_scales(self, schedule: Schedule) -> Optional[list[int]]:
        """Scales whose predictions the student pass reads (None: every scale)."""
        return None

    def prefix_length(self, adapter, schedule: Schedule) -> Optional[int]:
        """Tokens whose pass-1 keys / values pass 2 reuses (None: pass 2 runs in full)."""
        return None

    def passes(self, schedule: Schedule) -> int:
        """Student passes (with gradients) of a step over ``schedule``: 1 (:meth:`student`);
        more only for a rollout that implements :meth:`student_passes` (``ssr`` depth)."""
        return 1 if self.active and len(schedule) >= 2 else 0

    def check_schedule(self, schedule: Schedule) -> None:
        """Refuse (ValueError naming the fix) a training schedule this rollout cannot run."""

    def student_passes(self, adapter, model, cond: Any, gt_codes: list, pred_codes: list, schedule: Schedule,
                       teacher_logits: torch.Tensor, rng: random.Random,
                       generator: Optional[torch.Generator]) -> Iterator[StudentPass]:
        """The :meth:`passes` student passes in order, when there are more than one. The
        step computes each pass's loss (and back-propagates it) before asking for the next,
        so a pass may read only detached tensors of the earlier ones."""
        raise NotImplementedError(f"rollout '{self.name}' runs one student pass (student())")

    def predict(self, adapter, logits_cond: torch.Tensor, logits_uncond: Optional[torch.Tensor],
                schedule: Schedule, generator: Optional[torch.Generator],
                scales: Optional[Sequence[int]] = None) -> list:
        """Predicted codes per scale from detached teacher logits (B, L, V), scale order;
        ``None`` at scales not in ``scales`` (default: every scale).

        Sampling makes exactly one multinomial call per predicted scale (rows
        batch-major), so with every scale a seeded generator reproduces the official
        trainer's draws.
        """
        bits = adapter.bits_per_token
        n = len(schedule)
        wanted = set(range(n)) if scales is None else set(scales)
        preds = []
        for i in range(n):
            if i not in wanted:
                preds.append(None)
                continue
            sl = schedule.slice(i)
            lg = logits_cond[:, sl].float()
            if self.sampling == "argmax":
                preds.append(token_argmax(lg, bits))
                continue
            if logits_uncond is not None:
                lg = adapter.guide_logits(lg, logits_uncond[:, sl].float(), i, n, self.cfg)
            draw = sample_logits if self.upstream_exact else sample_candidates
            if bits is None:
                preds.append(draw(lg, self.top_k, self.top_p, generator))
            else:
                grouped = group_logits(lg, bits)
                preds.append(ungroup_codes(draw(grouped, self.top_k, self.top_p, generator), bits))
        return preds

    def transitions(self, schedule: Schedule, rng: random.Random) -> list[int]:
        """Scales k whose prediction feeds scale k+1 in the student pass."""
        n = len(schedule)
        if n < 2:
            return []
        if self.scales == "all":
            return list(range(n - 1))
        if self.scales == "last":
            return [n - 2]
        return [rng.randrange(n - 1)]

    def student(self, adapter, model, cond: Any, gt_codes: list, pred_codes: list,
                schedule: Schedule, teacher_logits: torch.Tensor, rng: random.Random) -> Optional[StudentPass]:
        """Build and run pass 2. Called with ``prefix=`` (a recorded
        :class:`~sar_core.sar.prefix_cache.PrefixKV`) only when :meth:`prefix_length` asked."""
        raise NotImplementedError


def _gather_scales(x: torch.Tensor, schedule: Schedule, scales: Sequence[int]) -> torch.Tensor:
    """Tokens of ``scales`` along dim 1: a view when they are consecutive (all built-in
    choices are), so no copy of the (B, L, V) logits is made."""
    if list(scales) == list(range(scales[0], scales[-1] + 1)):
        return x[:, schedule.offsets[scales[0]]:schedule.offsets[scales[-1] + 1]]
    return torch.cat([x[:, schedule.slice(k)] for k in scales], dim=1)


class NoRollout(Rollout):
    """Plain teacher forcing: no student-forced pass."""

    name = "none"
    active = False

    def student(self, *args, **kwargs) -> None:
        return None


class StaggerScaleRollout(Rollout):
    """The paper's SSR: one forward over the whole stagger-shifted sequence."""

    name = "ssr"

    def __init__(self, sampling: str = "argmax", top_k: int = 0, top_p: float = 0.0,
                 cfg: float = 1.0, scales: str = "all", upstream_exact: bool = False,
                 reuse_prefix: bool = True, depth: int = 1):
        super().__init__(sampling, top_k, top_p, cfg, scales, upstream_exact)
        self.reuse_prefix = bool(reuse_prefix)
        if isinstance(depth, bool) or int(depth) != depth or depth < 1:
            raise ValueError(f"ssr depth must be an integer >= 1 (1: the paper's one stagger step), got {depth!r}")
        self.depth = int(depth)
        if self.depth > 1 and scales != "all":
            raise ValueError(f"ssr depth {self.depth} needs scales='all' (every pass shifts every scale), "
                             f"got scales={scales!r}: set --ssr-scales all or --ssr-depth 1")
        if self.depth > 1 and self.upstream_exact:
            raise ValueError(f"ssr depth {self.depth} has no upstream counterpart: set upstream_exact=false "
                             "or --ssr-depth 1")

    def passes(self, schedule):
        return min(self.depth, len(schedule) - 1) if len(schedule) >= 2 else 0

    def check_schedule(self, schedule):
        if self.depth >= len(schedule):
            raise ValueError(f"ssr depth {self.depth} needs more than {self.depth} scales; the schedule "
                             f"{schedule} has {len(schedule)}: use --ssr-depth {max(1, len(schedule) - 1)} or less")

    def needed_scales(self, schedule):
        if self.scales == "last" and len(schedule) >= 2 and not self.upstream_exact:
            return [len(schedule) - 2, len(schedule) - 1]
        return None

    def prefix_length(self, adapter, schedule):
        if (self.reuse_prefix and self.scales == "last" and adapter.reuses_prefix and len(schedule) >= 2
                and not self.joint_cfg and not scales_alone(adapter)):
            return schedule.offsets[-2]
        return None

    def student(self, adapter, model, cond, gt_codes, pred_codes, schedule, teacher_logits, rng,
                prefix=None):
        ks = self.transitions(schedule, rng)
        if not ks:
            return None
        with torch.no_grad():
            inputs = adapter.stagger_inputs(gt_codes, pred_codes, schedule, ks)
        shifted = [k + 1 for k in ks]
        gt = torch.cat([gt_codes[k] for k in shifted], dim=1)
        teacher_codes = torch.cat([pred_codes[k] for k in shifted], dim=1)
        teacher = _gather_scales(teacher_logits, schedule, shifted).detach()
        if self.reuse_prefix and len(shifted) == 1 and scales_alone(adapter):  # it reads no other scale
            k, first = shifted[0], schedule.first_len
            short, full = scale_alone(model, cond, inputs, schedule, k)
            seen = inputs[:, schedule.offsets[k] - first:schedule.offsets[k + 1] - first]
            return StudentPass(schedule=short, inputs=seen, logits=full[:, short.first_len:], full=full,
                               start=short.first_len, teacher_logits=teacher, teacher_codes=teacher_codes,
                               gt_codes=gt, scales=tuple(shifted))
        if prefix is not None:  # only the last scale changed: run it alone on pass 1's prefix
            tail = inputs[:, prefix.length - schedule.first_len:]
            logits = model(cond, tail, schedule, prefix=prefix.replay())
            return StudentPass(schedule=schedule, inputs=inputs, logits=logits, teacher_logits=teacher,
                               teacher_codes=teacher_codes, gt_codes=gt, scales=tuple(shifted))
        logits = model(cond, inputs, schedule)
        view = _gather_scales(logits, schedule, shifted)
        consecutive = list(shifted) == list(range(shifted[0], shifted[-1] + 1))
        full = dict(full=logits, start=schedule.offsets[shifted[0]],
                    teacher_full=teacher_logits.detach()) if consecutive else {}
        return StudentPass(schedule=schedule, inputs=inputs, logits=view, teacher_logits=teacher,
                           teacher_codes=teacher_codes, gt_codes=gt, scales=tuple(shifted), **full)


    def student_passes(self, adapter, model, cond, gt_codes, pred_codes, schedule, teacher_logits, rng,
                       generator):
        """Passes 2 .. passes+1 of ``depth`` (module docstring); pass j's predictions at
        scales j-1 .. K-2 feed pass j+1."""
        K, first = len(schedule), schedule.first_len
        teacher_full = teacher_logits.detach()
        with torch.no_grad():
            tf_inputs = adapter.teacher_inputs(gt_codes, schedule)
        preds = [pred_codes]                      # preds[i - 1] = P_i (pass i's predictions)
        n = self.passes(schedule)
        for j in range(2, n + 2):
            with torch.no_grad():
                inputs = tf_inputs.clone()
                for s in range(j - 1, K):         # history gt[..s-j], P1[s-j+1], ..., P_{j-1}[s-1]
                    mixed = adapter.mix_codes(gt_codes, {t: preds[t - s + j - 1][t]
                                                         for t in range(max(0, s - j + 1), s)})
                    sl = slice(schedule.offsets[s] - first, schedule.offsets[s + 1] - first)
                    inputs[:, sl] = adapter.teacher_inputs(mixed, schedule)[:, sl]
            logits = model(cond, inputs, schedule)
            sup = list(range(j - 1, K))
            sp = StudentPass(schedule=schedule, inputs=inputs, logits=_gather_scales(logits, schedule, sup),
                             teacher_logits=_gather_scales(teacher_full, schedule, sup),
                             teacher_codes=torch.cat([pred_codes[s] for s in sup], dim=1),
                             gt_codes=torch.cat([gt_codes[s] for s in sup], dim=1), scales=tuple(sup),
                             extras={"pass": j}, full=logits, start=schedule.offsets[j - 1],
                             teacher_full=teacher_full)
            own = logits.detach()
            del logits
            yield sp                              # the step back-propagates pass j here
            if j < n + 1:                         # P_j at scales j-1 .. K-2 feeds pass j+1
                with torch.no_grad():
                    uncond = model(adapter.null_condition(cond), inputs, schedule) if self.uses_cfg else None
                    preds.append(self.predict(adapter, own, uncond, schedule, generator, scales=range(j - 1, K - 1)))
            del own


class OfficialRollout(Rollout):
    """The official SAR code: last transition only, start token as the only context."""

    name = "official"
    skips_parameters = True

    # Defaults are what the official scripts effectively run (their trainer's defaults,
    # since the command-line sampling flags never reach it): guided sampling, cfg 1.2,
    # top-k 900, top-p 0.96.
    def __init__(self, sampling: str = "sample", top_k: int = 900, top_p: float = 0.96,
                 cfg: float = 1.2, scales: str = "last", upstream_exact: bool = False):
        if scales != "last":
            raise ValueError("the official rollout student-forces the last transition only "
                             f"(scales='last'); got scales={scales!r}")
        super().__init__(sampling, top_k, top_p, cfg, scales, upstream_exact)

    def needed_scales(self, schedule):
        n = len(schedule)
        return None if self.upstream_exact or n < 2 else [n - 2, n - 1]

    def student(self, adapter, model, cond, gt_codes, pred_codes, schedule, teacher_logits, rng):
        n = len(schedule)
        if n < 2:
            return None
        cur, nxt = n - 2, n - 1
        with torch.no_grad():
            full = adapter.stagger_inputs(gt_codes, pred_codes, schedule, [cur])
            first = schedule.first_len
            inputs = full[:, schedule.offsets[nxt] - first: schedule.offsets[nxt + 1] - first]
        short = schedule.sub([0, nxt])
        full = model(cond, inputs, short, student_forcing=True)
        sl = schedule.slice(nxt)
        return StudentPass(
            schedule=short, inputs=inputs, logits=full[:, short.first_len:], full=full, start=short.first_len,
            teacher_logits=teacher_logits[:, sl].detach(), teacher_codes=pred_codes[nxt],
            gt_codes=gt_codes[nxt], scales=(nxt,),
            extras={"sf_scales": (schedule[cur], schedule[nxt]), "sf_input_codes": pred_codes[cur]})


BUILTIN_ROLLOUTS = {cls.name: cls for cls in (NoRollout, StaggerScaleRollout, OfficialRollout)}
