"""Distributed training under torchrun: process group, model wrapping, gradient sync.

``torchrun --nproc-per-node N -m sar_cli.main train ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK; without them everything runs in one process. Backend: nccl on CUDA, gloo on
CPU. DDP is the default; FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every
element of the backbone's ``nn.ModuleList`` s (the transformer blocks) and the root.

Gradient sync of a SAR step
---------------------------
A SAR micro-step runs up to two forwards and two backwards (the memory-lean backward of
:func:`sar_core.sar.step.sar_step`), and an optimizer step may accumulate several
micro-steps. :class:`GradSync` makes DDP all-reduce exactly once per optimizer step: every
forward runs without sync except the last expected one, whose backward all-reduces the
accumulated gradients. Each rank divides its losses by ``grad_accum`` and DDP averages
over ranks, so with equal micro-batches the gradient equals that of one process on the
whole global batch. If a step runs fewer forwards than expected (a rollout that skipped
its student pass), :meth:`GradSync.finish` all-reduces the gradients by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from sar_core.checkpoint_io import cpu_state


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (0, 1, 0 without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:1`` ... -> a device that exists (ValueError if not)."""
    if device in ("auto", "", None):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA GPU is visible to torch on this machine; "
                             "use --device cpu (or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); pick one of them")
    return dev


class PeerTimeout(RuntimeError):
    """A collective did not complete within ``dist.timeout_s``: a peer rank froze or died."""


def is_peer_timeout(exc: BaseException) -> bool:
    """True for the errors a collective raises when another rank stops answering."""
    if isinstance(exc, PeerTimeout):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        isinstance(exc, dist.DistBackendError) or "timed out" in text or "timeout" in text or "connection closed by peer" in text
        or "connection reset by peer" in text)


def init_distributed(device: str = "auto", backend: Optional[str] = None, timeout_s: float = 600.0) -> DistEnv:
    """Join torchrun's process group (if any) and pick this rank's device.

    ``timeout_s``: how long a collective waits for the other ranks before failing (a rank
    that froze then stops the others after this long instead of torch's 30 minutes)."""
    rank, world, local = env_world()
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=float(timeout_s))}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local, dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, env: DistEnv) -> list:
    if not env.enabled:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------- wrapping
def wrap_model(module: nn.Module, env: DistEnv, strategy: str, find_unused: bool) -> nn.Module:
    """The module the trainer calls: DDP / FSDP2 wrapped as configured (``--compile``
    compiles the blocks in place before: :mod:`sar_core.train.compiling`).

    ``module`` stays the owner of the parameters; with FSDP2 it is sharded in place.
    """
    if env.enabled and strategy == "fsdp":
        _fully_shard(module, env)
        model = module
    elif env.enabled:
        ids = [env.device.index] if env.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)
    else:
        model = module
    return model


def _fully_shard(module: nn.Module, env: DistEnv) -> None:
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # FSDP2 does not broadcast: start every rank from rank 0's weights
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                fully_shard(block)
    fully_shard(module)


def ddp_of(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    from torch._dynamo.eval_frame import OptimizedModule  # what torch.compile wraps a module in

    inner = model._orig_mod if isinstance(model, OptimizedModule) else model
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def is_fsdp(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(module, FSDPModule)


# ------------------------------------------------------------------------- state dicts
def model_state(module: nn.Module) -> dict:
    """Full (unsharded) CPU state dict; under FSDP2 every rank must call it."""
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # saved at once, so no copy: torch.save writes each storage from its own memory
    return cpu_state(module.state_dict())


def load_model_state(module: nn.Module, sd: dict) -> None:
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, sd, options=StateDictOptions(full_state_dict=True))
        return
    module.load_state_dict(sd, strict=True)


def optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """``sd``: this optimizer's own state dict, or a full one keyed by parameter name (an
    FSDP2 run's, also read into a single process or DDP)."""
    if is_fsdp(module) or _keyed_by_name(sd):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, sd, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(sd)


def _keyed_by_name(sd: dict) -> bool:
    groups = sd.get("param_groups") or [{}]
    return any(isinstance(p, str) for g in groups for p in g.get("params", ()))


# sharded state dicts (DCP checkpoints, :mod:`sar_core.train.sharded_ckpt`): this rank's
# shards of each tensor, DTensors under FSDP2 (whole tensors elsewhere), keyed by name
def sharded_model_state(module: nn.Module) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def load_sharded_model_state(module: nn.Module, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(module, sd)


def sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{"state": {name: {"exp_avg": ...}}, "param_groups": [...]}; an optimizer that has not
    stepped yet gets its state initialised first (a template to load into)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer)


def load_sharded_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, sd)


# ------------------------------------------------------------------------- gradient sync
class GradSync:
    """Decides, forward by forward, which backward all-reduces the gradients."""

    def __init__(self, model: nn.Module, module: nn.Module, env: DistEnv):
        self.model, self.module, self.env = model, module, env
        self.ddp = ddp_of(model)
        self.fsdp = is_fsdp(module)
        self.synced = False

    def begin_step(self) -> None:
        self.synced = False

    def micro(self, last_micro: bool, expected_forwards: int) -> "_SyncedModel":
        """The callable to hand to the SAR step for one micro-step."""
        if self.fsdp:
            self.module.set_requires_gradient_sync(last_micro)
            self.synced = self.synced or last_micro
        return _SyncedModel(self, last_micro, expected_forwards)

    def finish(self) -> None:
        """All-reduce by hand if no synced backward happened (DDP only)."""
        if not self.env.enabled or self.synced or self.fsdp:
            return
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.env.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()
        self.synced = True


class _SyncedModel:
    """Calls the wrapped model; only the last expected forward of the step syncs (DDP)."""

    def __init__(self, sync: GradSync, last_micro: bool, expected: int):
        self.sync, self.last_micro, self.expected, self.calls = sync, last_micro, expected, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # e.g. the null-condition rows of a guided rollout
            return self.sync.model(*args, **kwargs)
        self.calls += 1
        ddp = self.sync.ddp
        if ddp is not None:
            do_sync = self.last_micro and self.calls >= self.expected
            ddp.require_backward_grad_sync = do_sync
            self.sync.synced = self.sync.synced or do_sync
        return self.sync.model(*args, **kwargs)
