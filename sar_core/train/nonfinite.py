"""The non-finite guard of ``sar train``: count skipped steps, know the good checkpoint.

A run refuses to start from weights that are not finite (:func:`check_start_weights`).
A step whose loss or gradient is not finite is skipped by the trainer; the guard counts
them (in a row and in total) and says when to stop. It also remembers the run's first
non-finite step and the newest *good* checkpoint: one whose weights are finite and that
was written before that first non-finite step. Later checkpoints may hold weights that
were already on their way out (finite but huge); the good one is protected from
keep-last-N pruning and named in the stop message. The state travels in checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

from sar_core.train import checkpointing as ckpt


class NonFiniteWeights(ValueError):
    """The weights a run starts from hold NaN or an infinity (bad input: exit status 2)."""


def check_start_weights(tensors, buffers: frozenset[str], where: str, fix: str) -> None:
    """Raise NonFiniteWeights naming the first non-finite tensor of ``tensors`` (see
    :func:`~sar_core.train.checkpointing.first_nonfinite`)."""
    bad = ckpt.first_nonfinite(tensors, buffers)
    if bad is not None:
        raise NonFiniteWeights(f"the starting weights are not finite: tensor '{bad[0]}' of {where} holds "
                               f"{bad[1]}; {fix}")


def fresh_state() -> dict[str, Any]:
    # first: the run's first non-finite step; good: step of the newest good checkpoint
    return {"consecutive": 0, "total": 0, "first": None, "good": None}


def observe(state: dict, step: int, skipped: bool, max_consecutive: int, max_total: Optional[int],
            log: Callable[[str], None]) -> Optional[str]:
    """Count one step; returns a stop reason when a limit is reached."""
    if not skipped:
        state["consecutive"] = 0
        return None
    state["consecutive"] += 1
    state["total"] += 1
    if state["first"] is None:
        state["first"] = step
    log(f"[yellow]warning:[/] step {step}: non-finite loss or gradient; update skipped "
        f"({state['consecutive']} in a row, {state['total']} in total)")
    if state["consecutive"] >= max_consecutive:
        return f"{state['consecutive']} consecutive non-finite steps (max_nonfinite {max_consecutive})"
    if max_total is not None and state["total"] >= max_total:
        return f"{state['total']} non-finite steps in total (max_nonfinite_total {max_total})"
    return None


def mark_saved(state: dict, step: int, weights_finite: bool, log: Callable[[str], None]) -> None:
    """Record a checkpoint about to be written at ``step``."""
    if weights_finite and state["first"] is None:
        state["good"] = step
    elif not weights_finite:
        log(f"[yellow]warning:[/] the weights at step {step} are not finite; this checkpoint is not a good one")


def stop_message(state: dict, step: int, reason: str, ckpt_dir: Path) -> str:
    """One line: why the run stopped and which checkpoint to continue from."""
    first, good = state["first"], state["good"]
    msg = f"stopped at step {step}: {reason}"
    if first is not None:
        msg += f"; the first non-finite step was {first}"
    if good is None:
        return msg + "; no checkpoint was written before it: start again (e.g. with a lower --lr)"
    path = ckpt.step_checkpoint(ckpt_dir, good)
    newer = [s for s, _ in ckpt.list_checkpoints(ckpt_dir) if s > good]
    if not newer:
        return msg + f"; newest good checkpoint: step {good} ({path}): continue with --resume"
    return (msg + f"; newest good checkpoint: step {good} ({path}); the newer ones (steps "
            + ", ".join(map(str, newer)) + ") come after the first non-finite step: delete them to "
            f"--resume from step {good} (e.g. with a lower --lr)")


class NonFiniteGuard:
    """The guard as a run part: its counts travel in checkpoints (``state_dict``)."""

    def __init__(self, max_consecutive: int, max_total: Optional[int], log: Callable[[str], None]):
        self.max_consecutive, self.max_total, self.log = max_consecutive, max_total, log
        self.state = fresh_state()

    @property
    def good(self) -> Optional[int]:
        """Step of the newest good checkpoint (protected from pruning)."""
        return self.state["good"]

    def observe(self, step: int, skipped: bool) -> Optional[str]:
        return observe(self.state, step, skipped, self.max_consecutive, self.max_total, self.log)

    def mark_saved(self, step: int, weights_finite: bool) -> None:
        mark_saved(self.state, step, weights_finite, self.log)

    def stop_message(self, step: int, reason: str, ckpt_dir: Path) -> str:
        return stop_message(self.state, step, reason, ckpt_dir)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.state = {**self.state, **(state or {})}
