"""The batch types of the adapter contract: :class:`Batch` and :class:`Padded`, and the
collate that builds them from dataset items.

A dataset item is ``(x, target)``: ``x`` is an image float (3, H, W) in [-1, 1] or a list
of per-scale int64 code tensors; ``target`` is a class id, or a dict ``{"label": int
(optional), "<name>": tensor (n_i, D), ...}`` of per-sample condition payloads of varying
length (e.g. text features), padded here into :class:`Padded` with their lengths.
Imports nothing of sar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class Padded:
    """Per-sample payloads of varying length, zero-padded: ``values`` (B, N_max, ...) and
    ``lengths`` (B,) int64 (row i is valid in ``values[i, :lengths[i]]``)."""

    values: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Padded":
        return Padded(self.values.to(device, non_blocking=non_blocking),
                      self.lengths.to(device, non_blocking=non_blocking))

    def __getitem__(self, rows) -> "Padded":
        return Padded(self.values[rows], self.lengths[rows])

    def unpadded(self) -> list:
        """One (n_i, ...) tensor per sample."""
        return [v[: int(n)] for v, n in zip(self.values, self.lengths)]

    @classmethod
    def pad(cls, items: list) -> "Padded":
        """[(n_i, ...) tensors] -> Padded (zero padding along dim 0 of every item)."""
        items = [torch.as_tensor(x) for x in items]
        lengths = torch.as_tensor([x.shape[0] for x in items], dtype=torch.int64)
        n = int(lengths.max()) if len(items) else 0
        values = items[0].new_zeros((len(items), n, *items[0].shape[1:]))
        for i, x in enumerate(items):
            values[i, : x.shape[0]] = x
        return cls(values, lengths)


@dataclass
class Batch:
    """One micro-batch: images or codes, plus the condition's raw material.

    ``labels`` holds class ids (B,) int64, or None for datasets without classes;
    ``conditions`` maps payload names (e.g. ``"text_features"``) to :class:`Padded`
    per-sample payloads. The adapter turns a batch into its condition
    (:meth:`sar_core.adapter.ScaleWiseAdapter.condition`)."""

    labels: Optional[torch.Tensor] = None
    images: Optional[torch.Tensor] = None
    codes: Optional[list] = None
    conditions: dict = field(default_factory=dict)

    def __len__(self) -> int:
        for x in (self.labels, self.images):
            if x is not None:
                return int(x.shape[0])
        if self.codes is not None:
            return int(self.codes[0].shape[0])
        return int(next(iter(self.conditions.values())).lengths.shape[0])

    def rows(self, rows) -> "Batch":
        """The batch's rows ``rows`` (a slice or an index tensor)."""
        return Batch(None if self.labels is None else self.labels[rows],
                     None if self.images is None else self.images[rows],
                     None if self.codes is None else [c[rows] for c in self.codes],
                     {k: v[rows] for k, v in self.conditions.items()})

    def to(self, device: torch.device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(None if self.labels is None else self.labels.to(device, non_blocking=nb),
                     None if self.images is None else self.images.to(device, non_blocking=nb),
                     None if self.codes is None else [c.to(device, non_blocking=nb) for c in self.codes],
                     {k: v.to(device, non_blocking=nb) for k, v in self.conditions.items()})


def split_target(target: Any) -> tuple[Optional[int], dict]:
    """A dataset item's target -> (class id or None, {payload name: (n_i, ...) tensor}).

    A target is a class id (int / 0-d tensor) or a dict ``{"label": int (optional),
    "<name>": tensor (n_i, ...), ...}``."""
    if isinstance(target, dict):
        label = target.get("label")
        payloads = {k: torch.as_tensor(v) for k, v in target.items() if k != "label"}
        for k, v in payloads.items():
            if v.dim() < 1:
                raise TypeError(f"condition payload '{k}' must have a length dimension (n_i, ...), got a scalar")
        return (None if label is None else int(label)), payloads
    if target is None:
        return None, {}
    return int(target), {}


def collate(items: list) -> Batch:
    """[(image | codes, target), ...] -> Batch (dict payloads padded with their lengths)."""
    if not items:
        raise ValueError("empty batch")
    first = items[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise TypeError("dataset items must be (image, target) or (codes per scale, target) pairs, "
                        f"got {type(first).__name__}")
    targets = [split_target(it[1]) for it in items]
    has_label = {lab is not None for lab, _ in targets}
    if len(has_label) > 1:
        raise ValueError("some items of the batch have a class label and some do not")
    labels = torch.as_tensor([lab for lab, _ in targets], dtype=torch.int64) if True in has_label else None
    names = set(targets[0][1])
    if any(set(p) != names for _, p in targets):
        raise ValueError("every item of a batch must carry the same condition payloads")
    conditions = {k: Padded.pad([p[k] for _, p in targets]) for k in sorted(names)}
    x = first[0]
    if isinstance(x, (list, tuple)):
        codes = [torch.stack([torch.as_tensor(it[0][k]) for it in items]).long() for k in range(len(x))]
        return Batch(labels, codes=codes, conditions=conditions)
    return Batch(labels, images=torch.stack([it[0] for it in items]).float(), conditions=conditions)



