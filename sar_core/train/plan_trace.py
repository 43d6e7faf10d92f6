"""What one training step of a run config costs, traced on fake tensors (``sar plan``).

The model of the run config is built once inside :func:`~sar_core.train.fake_trace.fake_session`
(checkpoint files are read for their shapes only). Then, per *variant* (a rollout with its
options and an activation-checkpointing mode), the trainer's micro-step is traced: the
frozen tokenizer's encode of one image (when the data are images), then
:func:`~sar_core.sar.step.sar_step` with the memory-lean backward, under the run's autocast,
with the model in training mode and its gradients dropped before the step (the trainer's
``zero_grad(set_to_none=True)``; or allocated, see :func:`trace_run`). What is alive between
steps (weights, optimizer state, EMA, ...) is counted by :mod:`sar_core.train.plan`; a
trace measures the bytes above it.

Depth and batch are not traced at full size, because a fake op costs ~0.1-1 ms whatever
its shape: each variant is traced with the first 1 and then 2 transformer blocks active
(the others pass their input through) at micro-batch 1 and 2. Memory peaks are kept per
phase of the step (between consecutive model calls and backwards), each fitted as
``a + b * blocks + c * batch + d * blocks * batch`` and evaluated at the model's depth;
FLOPs likewise (exactly linear). ``tests/test_plan.py`` checks the fit against a
full-depth trace, and against a real step measured by ``benchmarks/memory.py``.
"""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from sar_core.schedule import Schedule
from sar_core.train.activation_ckpt import apply_activation_checkpointing
from sar_core.train.builders import build_adapter, build_schedule_sampler
from sar_core.train.config import RunConfig
from sar_core.train.fake_trace import FakeTrace, fake_session, mapped_loads, strict

BLOCKS = (1, 2)   # active blocks of the traced steps
BATCHES = (1, 2)  # micro-batches of the traced steps


@dataclass(frozen=True)
class Variant:
    """A rollout (registry name + options) under an activation-checkpointing mode."""

    label: str
    rollout: str
    options: tuple = ()
    ckpt: str = "none"


@dataclass
class Linear:
    """``a + b * batch`` (bytes or FLOPs) at the model's full depth."""

    a: float
    b: float

    def at(self, batch: float) -> float:
        return self.a + self.b * batch


@dataclass
class StepCost:
    """One variant at full depth: memory above the resident state, per phase, and FLOPs."""

    variant: Variant
    phases: dict[str, Linear]
    flops: Linear

    def peak(self, batch: float) -> float:
        return max(f.at(batch) for f in self.phases.values())

    def peak_phase(self, batch: float) -> str:
        return max(self.phases, key=lambda p: self.phases[p].at(batch))


@dataclass
class ModelFacts:
    """Sizes of the built model (bytes as stored: float32 unless the family says otherwise)."""

    family: str
    depth: int
    params: int                  # backbone parameters
    trainable: int               # of which trainable
    param_bytes: int
    trainable_bytes: int
    buffer_bytes: int
    block_param_bytes: int       # the largest transformer block
    tokenizer_bytes: int         # frozen tokenizer, parameters + buffers
    schedule: str
    tokens: int                  # tokens of the traced schedule
    mean_tokens: float           # mean tokens of the run's schedule sampler (random schedules)
    image_size: Optional[tuple[int, int]]  # None: training on cached codes
    extra: dict = field(default_factory=dict)


@dataclass
class Traced:
    facts: ModelFacts
    steps: list[StepCost]
    encode: Optional[StepCost]  # the tokenizer's encode (no gradients), None on code caches
    grads_in_step: bool          # the step's peaks include the gradients its backward allocates
    fake_ops: int = 0


def _bytes(tensors) -> int:
    seen, n = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:
            seen.add(id(st))
            n += int(st.nbytes())
    return n


def _codes(adapter, schedule: Schedule, batch: int) -> list:
    space = adapter.code_space
    high = 2 if space.bitwise else int(space.vocab_size)
    tail = (int(space.bits),) if space.bitwise else ()
    return [torch.randint(0, high, (batch, n, *tail)) for n in schedule.token_counts]


def _passthrough(x, *args, **kwargs):
    return x


class _Inputs:
    """Teacher / stagger inputs stood in for by an empty tensor of their shape (run once per
    shape, uncounted, to learn it): they need no gradient, and their tokenizer-side ops
    would otherwise cost most of every trace. Their transients and FLOPs (small next to a
    backbone pass) are left out of every trace alike."""

    def __init__(self, adapter, trace: FakeTrace):
        self.adapter, self.trace, self.memo = adapter, trace, {}
        self.teacher, self.stagger = adapter.teacher_inputs, adapter.stagger_inputs

    def _shaped(self, key, fn, *args):
        if key not in self.memo:
            with self.trace.paused(), torch.no_grad():
                out = fn(*args)
            self.memo[key] = (tuple(out.shape), out.dtype)
            del out
        shape, dtype = self.memo[key]
        return torch.zeros(shape, dtype=dtype)  # small ones are real: no uninitialised values (NaN)

    def install(self) -> None:
        ad = self.adapter
        ad.teacher_inputs = lambda codes, s: self._shaped(("t", codes[0].shape[0], str(s)), self.teacher, codes, s)
        ad.stagger_inputs = lambda gt, pred, s, scales: self._shaped(
            ("s", gt[0].shape[0], str(s), tuple(scales)), self.stagger, gt, pred, s, scales)

    def remove(self) -> None:
        for name in ("teacher_inputs", "stagger_inputs"):
            self.adapter.__dict__.pop(name, None)


class _Phases:
    """Marks a new phase at every backbone call (``fwd N``: the N-th call, its loss
    included), at every backward (``bwd N``: the backward after call N) and after it
    (``post N``: rollout sampling, building the next inputs)."""

    def __init__(self, trace: FakeTrace, model):
        self.trace, self.model, self.n = trace, model, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        self.trace.phase(f"fwd {self.n}")
        return self.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.trace.phase(f"bwd {self.n}")
        loss.backward()
        self.trace.phase(f"post {self.n}")


def _fit(points: dict, depth: int) -> tuple[dict[str, Linear], Linear]:
    """Bilinear fit in (blocks, batch) of the per-phase peaks and FLOPs, at ``depth``."""
    (k1, k2), (b1, b2) = BLOCKS, BATCHES

    def at_depth(v11, v12, v21, v22) -> Linear:
        # value(k, b) = p + q k + r b + s k b; evaluated at k = depth as a + b * batch
        s = (v22 - v21 - v12 + v11) / ((k2 - k1) * (b2 - b1))
        q = (v21 - v11) / (k2 - k1) - s * b1
        r = (v12 - v11) / (b2 - b1) - s * k1
        p = v11 - q * k1 - r * b1 - s * k1 * b1
        return Linear(p + q * depth, r + s * depth)

    names = points[(k1, b1)][0]
    phases = {n: at_depth(*(points[(k, b)][0].get(n, 0) for k in BLOCKS for b in BATCHES)) for n in names}
    flops = at_depth(*(points[(k, b)][1] for k in BLOCKS for b in BATCHES))
    return phases, flops


def trace_run(cfg: RunConfig, variants: list[Variant], registry, condition_tokens: Optional[int] = None,
              images: Optional[bool] = None, grads_in_step: bool = True, full_depth: bool = False) -> Traced:
    """Trace ``variants`` of the run ``cfg``; ``images``: whether the data are images
    (encode traced; default: unless the data are a code cache). ``grads_in_step``: the
    step starts without gradients and its backward allocates them, as the trainer's first
    micro-step after ``zero_grad(set_to_none=True)`` (then they are in the traced peaks);
    else they exist before the step (later micro-steps; FSDP2, whose sharded gradients
    :mod:`sar_core.train.plan` counts apart). ``full_depth`` traces every block at the two
    batches instead (slow; for checks)."""
    from sar_core.data.datasets import is_code_cache

    if images is None:
        images = not is_code_cache(cfg.data.name)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.bfloat16}[cfg.train.amp]
    collecting = gc.isenabled()
    gc.disable()  # a cycle of an earlier trace collected during a later one would lower its count
    try:
        return _trace(cfg, variants, registry, condition_tokens, images, grads_in_step, full_depth, amp)
    finally:
        if collecting:
            gc.enable()


def _trace(cfg, variants, registry, condition_tokens, images, grads_in_step, full_depth, amp) -> Traced:
    with fake_session() as trace:
        with mapped_loads():
            adapter = build_adapter(cfg, registry)
        sampler = build_schedule_sampler(adapter, cfg.model.schedule, cfg.train.seed, registry)
        if cfg.model.cond_drop is not None:
            adapter.condition_dropout = cfg.model.cond_drop
        backbone = adapter.backbone.train()
        facts = _facts(adapter, sampler, images)
        for p in backbone.parameters():
            if p.requires_grad and not grads_in_step:
                p.grad = torch.zeros_like(p)
        blocks = list(adapter.transformer_blocks())
        depth = len(blocks)
        counts = (depth,) if full_depth or depth <= max(BLOCKS) else BLOCKS
        inputs = _Inputs(adapter, trace)
        inputs.install()
        batches = {b: adapter.example_batch(b, facts.image_size, condition_tokens) for b in BATCHES}
        encode = _trace_encode(trace, adapter, sampler.default, batches[1], amp) if images else None
        raw: dict[Variant, dict] = {}
        try:
            for v in sorted(variants, key=lambda v: v.rollout == "none"):  # teacher forcing last
                donor = next((d for d in raw if d.ckpt == v.ckpt and _tf_inside(d, adapter, sampler.default,
                                                                                  registry)), None)
                if v.rollout == "none" and not v.options and donor is not None:
                    raw[v] = {kb: _teacher_part(pt) for kb, pt in raw[donor].items()}
                    continue
                raw[v] = {}
                for k in counts:
                    apply_activation_checkpointing(blocks, "none")
                    apply_activation_checkpointing(blocks[:k], v.ckpt)
                    for block in blocks[k:]:
                        block.forward = _passthrough
                    for b in BATCHES:
                        if grads_in_step:
                            backbone.zero_grad(set_to_none=True)
                        raw[v][(k, b)] = _trace_step(trace, adapter, sampler.default, batches[b], v, registry,
                                                     amp, images)
        finally:
            apply_activation_checkpointing(blocks, "none")
            inputs.remove()
        steps = []
        for v in variants:
            points = raw[v]
            if len(counts) == 1:  # traced at full depth: the same points for both block counts
                points = {(k, b): points[(counts[0], b)] for k in BLOCKS for b in BATCHES}
                phases, flops = _fit(points, max(BLOCKS))
            else:
                phases, flops = _fit(points, depth)
            steps.append(StepCost(v, phases, flops))
        return Traced(facts, steps, encode, grads_in_step, trace.ops)


def _facts(adapter, sampler, images: bool) -> ModelFacts:
    bb, tok = adapter.backbone, adapter.tokenizer
    params = list(bb.parameters())
    blocks = list(adapter.transformer_blocks())
    draw = build_mean_tokens(sampler)
    schedule = sampler.default
    return ModelFacts(
        family=adapter.name, depth=len(blocks), params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        param_bytes=_bytes(params), trainable_bytes=_bytes([p for p in params if p.requires_grad]),
        buffer_bytes=_bytes(list(bb.buffers())),
        block_param_bytes=max((_bytes(list(b.parameters())) for b in blocks), default=0),
        tokenizer_bytes=_bytes(list(tok.parameters()) + list(tok.buffers())),
        schedule=str(schedule), tokens=schedule.total_tokens, mean_tokens=draw,
        image_size=tuple(adapter.training_image_size(sampler)) if images else None)


def build_mean_tokens(sampler, draws: int = 200) -> float:
    """Mean token count of ``draws`` schedules from a copy of ``sampler`` (its state kept)."""
    state = sampler.state_dict()
    try:
        return sum(sampler.sample().total_tokens for _ in range(draws)) / draws
    finally:
        sampler.load_state_dict(state)


def _autocast(amp):
    return torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None)


def _trace_encode(trace: FakeTrace, adapter, schedule: Schedule, batch, amp) -> StepCost:
    """The frozen tokenizer's encode of one image (no gradients, nothing shared across the
    batch: memory and FLOPs are per image)."""
    trace.reset()
    base = trace.current
    with strict(trace), torch.no_grad(), _autocast(amp):
        codes = adapter.encode(batch.images[:1], schedule)
    del codes
    return StepCost(Variant("encode", "none"), {"encode": Linear(0.0, trace.peak - base)}, Linear(0.0, trace.flops))


def _trace_step(trace: FakeTrace, adapter, schedule: Schedule, batch, variant: Variant, registry, amp,
                images: bool) -> tuple[dict, int, dict]:
    """Peak bytes per phase (the micro-batch's images, codes and condition included), FLOPs,
    and the FLOPs counted before each phase began."""
    from torch.utils._pytree import tree_leaves

    from sar_core.sar.step import sar_step

    rollout = registry.get("rollout", variant.rollout)(**dict(variant.options))
    loss = registry.get("loss", "hard")()
    codes = _codes(adapter, schedule, len(batch))
    cond: Any = adapter.condition(batch)
    held = [t for t in tree_leaves([codes, cond]) if isinstance(t, torch.Tensor)]
    if images:  # the trainer holds the image batch through the step
        held.append(batch.images)
    inputs = _bytes(held)
    trace.reset()
    base = trace.current
    phases = _Phases(trace, adapter.backbone)
    trace.phase("inputs")
    with strict(trace), _autocast(amp):
        sar_step(adapter, phases, cond, codes, schedule, rollout, loss, gamma=0.01,
                 generator=torch.Generator().manual_seed(0), rng=random.Random(0), backward=phases.backward)
    return {p: v - base + inputs for p, v in trace.phases.items()}, trace.flops, dict(trace.phase_flops)


#: the phases of a SAR step that are its teacher-forcing pass (see :func:`_tf_inside`)
TF_PHASES = ("inputs", "fwd 1", "bwd 1")


def _tf_inside(v: Variant, adapter, schedule: Schedule, registry) -> bool:
    """Whether ``v``'s step begins with exactly a teacher-forcing step: no guided null rows
    and no recorded prefix in pass 1 (then ``sar_step`` runs pass 1, its loss and its
    backward as with the rollout ``none``, and the rollout starts in phase ``post 1``)."""
    if v.rollout == "none":
        return False
    r = registry.get("rollout", v.rollout)(**dict(v.options))
    return r.active and not r.uses_cfg and r.prefix_length(adapter, schedule) is None


def _teacher_part(point: tuple) -> tuple:
    phases, _, flops_at = point
    return {p: phases[p] for p in TF_PHASES if p in phases}, flops_at["post 1"], {}
