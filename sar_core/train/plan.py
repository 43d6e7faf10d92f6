"""``sar plan``: what a run config needs per GPU, and how long it takes, before the run.

From one traced step (:mod:`sar_core.train.plan_trace`: fake tensors, nothing allocated)
and the model's sizes, per rank:

* **state** between steps: float32 weights, gradients, AdamW's two moments and the EMA
  shadow; under FSDP2 (``--dist fsdp``, more than one GPU) each is 1 / N of the whole, plus
  what FSDP2 unshards while it runs: two blocks' weights (the current one and the
  prefetched next), one block's unsharded gradients before their reduce-scatter, and the
  root module's weights and gradients (embeddings, head: ``fully_shard`` of the root
  keeps them whole through forward and backward). DDP keeps everything whole plus its
  gradient buckets (one more copy of the gradients: the trainer's DDP does not use
  ``gradient_as_bucket_view``). The frozen tokenizer and the buffers are whole on every
  rank. Fused AdamW (what the trainer uses on CUDA) needs no temporaries.
* **activations**: the traced peak above that state, per rollout and activation-
  checkpointing mode, as ``a + b * micro_batch`` (the micro-batch's images, codes and
  condition included), and the tokenizer's encode (before the step; per image).

A micro-batch fits when state + max(encode, step) stays within ``(1 - headroom)`` of the
GPU's memory (the headroom is for the CUDA context, NCCL buffers and the caching
allocator's fragmentation, which a trace does not see). Time: the FLOPs of a step as
executed (``torch.utils.flop_counter``'s matrix products, convolutions and attention;
recomputation included, the same count ``benchmarks/gpu_bench.py`` divides by to report
MFU) over ``mfu * peak``; communication and the optimizer update are assumed hidden or
negligible. Random schedules (FlexVAR's) are traced at the sampler's default, its
largest; the step's time (not the encode's) is scaled by the sampler's mean token count
over the traced one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from sar_core.train.config import RunConfig
from sar_core.train.plan_trace import StepCost, Traced, Variant, trace_run

GIB = float(2 ** 30)
CKPT_MODES = ("none", "selective", "full")
#: the rollouts ``--compare`` puts side by side (their built-in defaults otherwise)
ROLLOUTS = (("tf", "none", ()), ("ssr-all", "ssr", (("scales", "all"),)), ("ssr-last", "ssr", (("scales", "last"),)),
            ("official", "official", ()))
MAX_MICRO_BATCH = 1 << 16


@dataclass
class Hardware:
    gpus: int = 1
    memory_gib: float = 80.0
    peak_tflops: float = 312.0  # A100 bf16 dense
    mfu: float = 0.4
    headroom: float = 0.1

    def check(self) -> None:
        if self.gpus < 1 or self.memory_gib <= 0 or self.peak_tflops <= 0:
            raise ValueError("--gpus, --gpu-memory and --gpu-peak-tflops must be positive")
        if not 0 < self.mfu <= 1 or not 0 <= self.headroom < 1:
            raise ValueError(f"--mfu must lie in (0, 1] and --headroom in [0, 1); got {self.mfu}, {self.headroom}")

    @property
    def budget(self) -> float:
        return self.memory_gib * GIB * (1 - self.headroom)


@dataclass
class Row:
    """One variant on this hardware."""

    label: str
    ckpt: str
    activations_gib: float       # at the run's micro-batch (or 1 if it does not divide)
    per_image_gib: float
    peak_phase: str
    max_micro_batch: int         # 0: not even one image fits
    flops_per_image: float       # executed, encode included
    step_s: float                # one optimizer step at the run's global batch
    gpu_hours: Optional[float]   # for the dataset and epochs asked for


@dataclass
class Plan:
    config: dict
    hardware: dict
    model: dict
    strategy: str
    micro_batch: int
    grad_accum: int
    state_gib: dict
    encode_gib_per_image: Optional[float]
    encode_flops_per_image: float
    grads_in_step: bool
    rows: list
    dataset_size: Optional[int]
    epochs: float
    token_scale: float
    fake_ops: int

    def to_dict(self) -> dict:
        return asdict(self)


def variants(cfg: RunConfig, compare: bool) -> list[Variant]:
    """The run's own rollout, plain teacher forcing, and with ``compare`` every built-in
    rollout under every checkpointing mode."""
    ckpt = cfg.train.activation_checkpointing
    own = Variant(f"{cfg.rollout.name} (this run)", cfg.rollout.name, tuple(sorted(cfg.rollout.options().items())), ckpt)
    out = [own, Variant("tf", "none", (), ckpt)]
    if compare:
        out += [Variant(label, name, opts, mode) for mode in CKPT_MODES for label, name, opts in ROLLOUTS]
    seen, unique = set(), []
    for v in out:
        key = (v.rollout, v.options, v.ckpt)
        if key not in seen:
            seen.add(key)
            unique.append(v)
    return unique


def state_bytes(traced: Traced, strategy: str, gpus: int, ema: bool) -> dict[str, float]:
    """Bytes per rank that live between steps (see the module docstring)."""
    f = traced.facts
    sharded = strategy == "fsdp" and gpus > 1
    n = gpus if sharded else 1
    w, g = f.param_bytes, f.trainable_bytes
    out = {"weights": w / n, "gradients": g / n, "AdamW moments": 2 * g / n, "EMA": g / n if ema else 0.0,
           "buffers": float(f.buffer_bytes), "tokenizer (frozen)": float(f.tokenizer_bytes)}
    if strategy == "ddp" and gpus > 1:
        out["DDP gradient buckets"] = float(g)
    if sharded:
        root = max(w - f.depth * f.block_param_bytes, 0)
        out["FSDP2 unsharded (2 blocks + root, grads)"] = 3.0 * f.block_param_bytes + 2.0 * root
    return out


def max_micro_batch(step: StepCost, encode: Optional[StepCost], room: float) -> int:
    """Largest micro-batch whose activations (and encode) fit in ``room`` bytes."""
    best = float(MAX_MICRO_BATCH)
    for cost in [step] + ([encode] if encode is not None else []):
        for line in cost.phases.values():
            if line.b > 0:
                best = min(best, (room - line.a) / line.b)
            elif line.a > room:
                return 0
    return max(int(math.floor(best)), 0)


def make_plan(cfg: RunConfig, hw: Hardware, registry, dataset_size: Optional[int] = None, epochs: float = 1.0,
              compare: bool = False, condition_tokens: Optional[int] = None, traced: Optional[Traced] = None) -> Plan:
    hw.check()
    if dataset_size is not None and dataset_size < 1 or epochs <= 0:
        raise ValueError("--dataset-size must be >= 1 and --epochs > 0")
    t = cfg.train
    sharded = cfg.dist.strategy == "fsdp" and hw.gpus > 1
    traced = traced or trace_run(cfg, variants(cfg, compare), registry, condition_tokens,
                                 grads_in_step=t.grad_accum == 1 and not sharded)
    f = traced.facts
    strategy = cfg.dist.strategy if hw.gpus > 1 else "single"
    state = state_bytes(traced, cfg.dist.strategy, hw.gpus, t.ema > 0)
    # gradients the step allocates itself are in its traced peaks; between steps they are alive
    room = hw.budget - sum(state.values()) + (state["gradients"] if traced.grads_in_step else 0.0)
    if sum(state.values()) > hw.budget:
        room = min(room, 0.0)
    per_rank = t.batch_size / hw.gpus
    micro = t.batch_size // (hw.gpus * t.grad_accum) if t.batch_size % (hw.gpus * t.grad_accum) == 0 else 1
    token_scale = f.mean_tokens / f.tokens if f.tokens else 1.0
    enc_flops = traced.encode.flops.b if traced.encode is not None else 0.0
    rows = []
    for s in traced.steps:
        step_flops = s.flops.b + s.flops.a / max(micro, 1)
        flops = step_flops + enc_flops
        sec_per_image = (step_flops * token_scale + enc_flops) / (hw.mfu * hw.peak_tflops * 1e12)
        act = max(s.peak(micro), traced.encode.peak(micro) if traced.encode is not None else 0.0)
        if traced.grads_in_step:  # counted with the state (alive between steps)
            act = max(act - state["gradients"], 0.0)
        hours = dataset_size * epochs * sec_per_image / 3600 if dataset_size else None
        rows.append(Row(s.variant.label, s.variant.ckpt, act / GIB, max(l.b for l in s.phases.values()) / GIB,
                        s.peak_phase(micro), max_micro_batch(s, traced.encode, room), flops,
                        per_rank * sec_per_image, hours))
    model = {k: v for k, v in asdict(f).items() if k != "extra"}
    return Plan(config={"family": cfg.model.family, "rollout": cfg.rollout.name, "amp": t.amp,
                        "activation_checkpointing": t.activation_checkpointing, "batch_size": t.batch_size,
                        "grad_accum": t.grad_accum, "dist": cfg.dist.strategy, "ema": t.ema},
                hardware=asdict(hw), model=model, strategy=strategy, micro_batch=micro, grad_accum=t.grad_accum,
                state_gib={k: v / GIB for k, v in state.items()},
                encode_gib_per_image=traced.encode.phases["encode"].b / GIB if traced.encode is not None else None,
                encode_flops_per_image=enc_flops, grads_in_step=traced.grads_in_step, rows=rows, dataset_size=dataset_size, epochs=epochs, token_scale=token_scale,
                fake_ops=traced.fake_ops)


def advice(plan: Plan) -> list[str]:
    """Plain-language lines: does the run fit, and what to change if not."""
    own = plan.rows[0]
    hw = plan.hardware
    budget = hw["memory_gib"] * (1 - hw["headroom"])
    state = sum(plan.state_gib.values())
    lines = []
    if state >= budget:
        lines.append(f"the training state alone ({state:.1f} GiB per rank) exceeds the {budget:.1f} GiB usable: "
                     + ("shard it with --dist fsdp" if plan.strategy != "fsdp" else "use more GPUs"))
        return lines
    ckpt = plan.config["activation_checkpointing"]
    more = {"none": "--set train.activation_checkpointing=selective (or full)",
            "selective": "--set train.activation_checkpointing=full"}.get(ckpt)
    if own.max_micro_batch < 1:
        fixes = [f for f in (more, "--dist fsdp" if plan.strategy != "fsdp" else None, "more GPUs") if f]
        lines.append("not even one image fits: try " + ", ".join(fixes))
    elif own.max_micro_batch < plan.micro_batch:
        per_rank = plan.config["batch_size"] // hw["gpus"]
        accum = math.ceil(per_rank / own.max_micro_batch)
        while per_rank % accum:
            accum += 1
        lines.append(f"micro-batch {plan.micro_batch} does not fit (at most {own.max_micro_batch}): use "
                     f"--grad-accum {accum} (micro-batch {per_rank // accum})" + (f" or {more}" if more else ""))
    else:
        lines.append(f"micro-batch {plan.micro_batch} fits ({state + own.activations_gib:.1f} of {budget:.1f} GiB "
                     f"usable); the largest that fits is {own.max_micro_batch}")
    return lines
