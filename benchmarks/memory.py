"""Memory of a training step, independent of what ran before it.

CPU: :class:`LiveTensorBytes` counts the bytes of every tensor storage alive at each
moment: the storages that exist when it starts (weights, gradients, optimizer state,
inputs: given explicitly) plus every storage an op creates while it is active (seen
through ``TorchDispatchMode``, forward and backward), minus each storage freed (a
``weakref.finalize`` on the storage). It reads what is alive, not allocator history, so a
figure does not depend on earlier runs, caches or the allocator.

CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus/plus
``memory_allocated`` at the start.

Both give the step's peak above its start and the whole-process peak of the training
state (weights + gradients + optimizer state + activations).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class StepMemory:
    resident: int    # bytes alive when the step starts (weights, grads, optimizer state, inputs)
    step_peak: int   # peak above the start
    process_peak: int  # resident + step_peak

    def mib(self) -> dict:
        return {k: v / 2 ** 20 for k, v in vars(self).items()}


class LiveTensorBytes(TorchDispatchMode):
    """Live storage bytes while active; ``peak`` is the maximum of ``current``."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._seen: dict[int, int] = {}  # storage key -> bytes
        self.current = self.peak = 0
        for t in resident:
            self._track(t)
        self.start = self.peak = self.current

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._track(t)
        return out


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   extra: Iterable = ()) -> list[torch.Tensor]:
    """Weights, gradients, buffers and optimizer state (what lives between steps)."""
    out = [p for p in model.parameters()] + [b for b in model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        out += [v for st in optimizer.state.values() for v in tree_leaves(st) if isinstance(v, torch.Tensor)]
    out += [t for t in tree_leaves(list(extra)) if isinstance(t, torch.Tensor)]
    return out


def measure_step(step: Callable[[], None], resident: list[torch.Tensor], device: torch.device) -> StepMemory:
    """Run ``step`` once and return its memory (see the module docstring).

    ``resident`` is emptied once counted: the list would otherwise keep its tensors alive
    through the step, e.g. the gradients a ``zero_grad(set_to_none=True)`` drops, which
    then counted twice once the backward allocates new ones."""
    if device.type == "cuda":
        resident.clear()
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return StepMemory(start, peak - start, peak)
    mode = LiveTensorBytes(resident)
    resident.clear()
    with mode:
        step()
    return StepMemory(mode.start, mode.peak - mode.start, mode.peak)
