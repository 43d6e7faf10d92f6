"""Running a student pass over the scales it changes only: pass 1's keys / values for an
unchanged prefix (``ssr`` with ``scales='last'``), or no prefix at all.

What a scale reads depends on the family's attention pattern
(:attr:`~sar_core.adapter.ScaleWiseAdapter.attention`):

* ``within-scale``: a token attends to its own scale only, so scale k's logits are those
  of a pass over the sub-schedule [scale 0, scale k] on scale k's inputs
  (:func:`scale_alone`). A student pass that changes one scale runs that short pass: no
  keys / values are recorded, nothing of pass 1 is read, and the SAR step keeps its
  memory-lean two backwards.
* ``block-causal``: a token of scale k attends to scales <= k. When the student pass
  changes only the inputs of the last scale, every token before it sees the same inputs
  as in the teacher pass, so its hidden states - and its keys and values in every layer -
  are pass 1's. The student pass then only has to run the last scale's tokens, attending
  to pass 1's prefix keys / values.

Gradients stay those of a full second pass because the prefix keys / values are kept
*with their graph*: the CSF loss back-propagates through them into pass 1, so the step
does one backward over both passes (instead of the memory-lean two). The condition that
pass 1 drew (after condition dropout) is reused as well, so both passes see the same
row conditions.

A block-causal family opts in by setting :attr:`ScaleWiseAdapter.reuses_prefix` and
accepting ``prefix=`` in its backbone's ``forward`` (see :class:`PrefixRecord` /
:class:`PrefixReplay`). Other block-causal families get a full second pass.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sar_core.schedule import Schedule


def scales_alone(adapter) -> bool:
    """True when each scale's logits read no other scale (within-scale attention)."""
    return adapter.attention == "within-scale"


def scale_alone(model, cond: Any, inputs: torch.Tensor, schedule: Schedule, k: int) -> tuple[Schedule, torch.Tensor]:
    """Scale k (>= 1) of a within-scale family on its own: ``model`` over the sub-schedule
    [scale 0, scale k] on scale k's inputs, cut from ``inputs`` (B, L - first_len, C) of
    ``schedule``. Returns (that sub-schedule, its logits (B, first_len + n_k, V)); scale
    k's are ``[:, first_len:]``."""
    if not 1 <= k < len(schedule):
        raise ValueError(f"scale_alone({k}) of a {len(schedule)}-scale schedule")
    first = schedule.first_len
    short = schedule.sub([0, k])
    return short, model(cond, inputs[:, schedule.offsets[k] - first:schedule.offsets[k + 1] - first], short)


class PrefixKV:
    """Keys / values (B, H, length, c) of the first ``length`` tokens, per layer."""

    def __init__(self, length: int):
        self.length = int(length)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.state: dict[str, Any] = {}  # family-specific per-pass facts (e.g. dropped labels)

    def head(self, length: int) -> "PrefixKV":
        """The first ``length`` (<= recorded) tokens' keys / values, same per-pass state: one
        recorded teacher pass serves replays that start at any earlier scale boundary."""
        if not 0 < length <= self.length:
            raise ValueError(f"head({length}) of a {self.length}-token prefix")
        out = PrefixKV(length)
        out.kv = {i: (k[:, :, :length], v[:, :, :length]) for i, (k, v) in self.kv.items()}
        out.state = self.state
        return out

    def record(self) -> "PrefixRecord":
        return PrefixRecord(self)

    def replay(self) -> "PrefixReplay":
        if not self.kv:
            raise RuntimeError("PrefixKV.replay(): nothing was recorded (run pass 1 with prefix=record())")
        return PrefixReplay(self)


class PrefixRecord:
    """Given to pass 1: the backbone runs in full and stores each layer's prefix K/V."""

    replay = False

    def __init__(self, cache: PrefixKV):
        self.cache = cache

    def layer(self, i: int) -> "_LayerSlot":
        return _LayerSlot(self.cache, i, replay=False)


class PrefixReplay:
    """Given to pass 2: inputs hold only the tokens from ``length`` on; attention prepends
    the recorded prefix K/V."""

    replay = True

    def __init__(self, cache: PrefixKV):
        self.cache = cache

    def layer(self, i: int) -> "_LayerSlot":
        return _LayerSlot(self.cache, i, replay=True)


class _LayerSlot:
    """What one attention layer sees. The mode is fixed at creation, so an activation
    checkpoint's recomputation repeats exactly what the first forward did."""

    def __init__(self, cache: PrefixKV, index: int, replay: bool):
        self.cache, self.index, self.replay = cache, index, replay

    # Not traced by torch.compile (``--compile``, sar_core.train.compiling): traced, the
    # layer index, the cache's length and its dict's size become guards of the block's
    # graph, i.e. one graph per layer and per prefix length (past dynamo's recompile limit
    # at real depth, where it silently runs the rest eagerly). Run eagerly, the block's
    # graph breaks here and its pieces are shared by every layer and prefix length.
    @torch.compiler.disable(reason="prefix K/V slot: per-layer Python state")
    def __call__(self, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys / values the layer attends to."""
        n = self.cache.length
        if self.replay:
            pk, pv = self.cache.kv[self.index]
            return torch.cat((pk, k_BHLc), dim=2), torch.cat((pv, v_BHLc), dim=2)
        self.cache.kv[self.index] = (k_BHLc[:, :, :n], v_BHLc[:, :, :n])
        return k_BHLc, v_BHLc


def layer_slot(prefix: Optional[PrefixRecord | PrefixReplay], i: int) -> Optional[_LayerSlot]:
    return None if prefix is None else prefix.layer(i)
