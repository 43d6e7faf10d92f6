"""The batch types of the adapter contract: :class:`Batch` and :class:`Padded`, the
collate that builds them from dataset items, and :class:`PayloadSpec`: what a family says
it reads from ``Batch.conditions`` (checked by :func:`check_payloads`).

A dataset item is ``(x, target)``: ``x`` is an image float (3, H, W) in [-1, 1] or a list
of per-scale int64 code tensors; ``target`` is a class id, or a dict ``{"label": int
(optional), "<name>": tensor (n_i, D), ...}`` of per-sample condition payloads of varying
length (e.g. text features), padded here into :class:`Padded` with their lengths.
Imports nothing of sar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

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





def cat_conditions(conds: Sequence[Any]) -> Any:
    """Row-concatenate conditions that are tensors, or dicts of tensors padded along dim 1
    (values) with per-row lengths. Families with another layout override
    :meth:`ScaleWiseAdapter.cfg_condition`."""
    first = conds[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(conds), dim=0)
    if isinstance(first, dict):
        out = {}
        for key in first:
            vals = [c[key] for c in conds]
            if isinstance(vals[0], torch.Tensor) and vals[0].dim() >= 2 and len({v.shape[1] for v in vals}) > 1:
                n = max(v.shape[1] for v in vals)
                vals = [torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, n - v.shape[1])) for v in vals]
            out[key] = torch.cat(vals, dim=0) if isinstance(vals[0], torch.Tensor) else sum(vals, [])
        return out
    raise TypeError(f"cannot concatenate conditions of type {type(first).__name__}; "
                    "override cfg_condition() for this family")


# ----------------------------------------------------------------------------- payload specs
@dataclass(frozen=True)
class PayloadSpec:
    """One named condition payload a family reads: per sample a float (n_i, dim) tensor.

    ``dim``: the feature width (None: any); ``rows``: n_i when it is fixed (1 for a pooled
    vector; None: any n_i >= 1); ``required``: False when the family can do without it
    (e.g. it takes class labels too); ``encoded_null``: the payload's null (unconditional)
    value is the text encoder's output for the empty prompt, which no checkpoint holds, so
    the adapter must be given it (``ScaleWiseAdapter.set_null_payloads``: ``--null-payload``,
    a data folder's ``null_payloads.pt``) before guidance or condition dropout."""

    dim: Optional[int] = None
    rows: Optional[int] = None
    required: bool = True
    encoded_null: bool = False

    def __str__(self) -> str:
        return f"({self.rows if self.rows is not None else 'n'}, {self.dim if self.dim is not None else 'D'})"


def describe_payloads(specs: Mapping[str, PayloadSpec]) -> str:
    """'a (1, 768), b (n, 2048)' (or 'none')."""
    return ", ".join(f"{k} {v}" for k, v in sorted(specs.items())) or "none"


def _sample_shape(value: Any) -> tuple[Optional[int], tuple]:
    """(rows of a sample or None when they vary, trailing shape) of a Padded or one (n_i, ...) tensor."""
    if isinstance(value, Padded):
        lens = set(value.lengths.tolist())
        return (lens.pop() if len(lens) == 1 else None), tuple(value.values.shape[2:])
    t = torch.as_tensor(value)
    return (int(t.shape[0]) if t.dim() else None), tuple(t.shape[1:])


def check_payloads(specs: Mapping[str, PayloadSpec], payloads: Mapping[str, Any], family: str, where: str,
                   hint: str = "") -> None:
    """Raise ValueError (one line, naming the payload) when ``payloads`` (name -> Padded, or
    one sample's (n_i, ...) tensor) lack a required payload of ``specs``, hold one the
    family does not read, or one of the wrong width / row count. ``where`` names the
    source (e.g. "the data", "--payload"), ``hint`` the fix."""
    hint = f"; {hint}" if hint else ""
    wants = describe_payloads(specs)
    extra = sorted(set(payloads) - set(specs))
    if extra and not specs:
        raise ValueError(f"unexpected condition payload '{extra[0]}' from {where}: family '{family}' reads none "
                         "(it is class-conditional, not text-conditioned: give class labels)")
    if extra:
        raise ValueError(f"unexpected condition payload '{extra[0]}' from {where}: family '{family}' reads "
                         f"{wants}{hint}")
    for name, spec in sorted(specs.items()):
        if name not in payloads:
            if spec.required:
                have = ", ".join(sorted(payloads)) or "none"
                raise ValueError(f"missing condition payload '{name}' {spec}: family '{family}' reads {wants}; "
                                 f"{where} gives {have}{hint}")
            continue
        rows, tail = _sample_shape(payloads[name])
        if spec.dim is not None and (len(tail) != 1 or tail[0] != spec.dim):
            got = "x".join(map(str, tail)) or "scalar"
            raise ValueError(f"condition payload '{name}' from {where} has {got}-wide rows; family '{family}' "
                             f"needs {spec} (use the text encoder the model was trained with){hint}")
        if spec.rows is not None and rows != spec.rows:
            raise ValueError(f"condition payload '{name}' from {where} has {rows if rows is not None else 'varying'} "
                             f"rows per sample; family '{family}' needs exactly {spec.rows} {spec}{hint}")


def check_null_payloads(specs: Mapping[str, PayloadSpec], payloads: Mapping[str, Any],
                        family: str) -> dict[str, torch.Tensor]:
    """The encoder-derived null payloads of ``specs`` (those with ``encoded_null``) from
    ``payloads`` (name -> (n, dim) tensor, or (dim,)), as float tensors; a one-line
    ValueError for a family without them, a missing / unexpected one or a wrong width."""
    wanted = {k: PayloadSpec(v.dim, v.rows) for k, v in specs.items() if v.encoded_null}
    if not wanted:
        raise ValueError(f"family '{family}' builds its own null condition (no encoder-derived null payloads); "
                         "drop --null-payload")
    vals = {}
    for k, v in payloads.items():
        t = torch.as_tensor(v).float()
        vals[k] = t[None] if t.dim() == 1 else t
        if vals[k].dim() != 2:
            raise ValueError(f"null payload '{k}' must be one (n, dim) tensor, got {tuple(t.shape)}")
    check_payloads(wanted, vals, family, "the null payloads", "give the encoder's features of the empty "
                   "prompt for each (--null-payload NAME=FILE; sar encode-text writes null_payloads.pt)")
    return vals


def random_batch(batch_size: int, image_size: tuple[int, int], num_classes: Optional[int],
                 specs: Mapping[str, PayloadSpec], condition_tokens: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> Batch:
    """Random training data of given shapes (``sar plan`` builds it on fake tensors): images
    in [-1, 1], class ids when ``num_classes``, and every payload of ``specs`` a family needs
    (all of them without classes; else the required ones) as :class:`Padded` rows of its
    width: ``spec.rows`` rows, or ``condition_tokens`` where the rows vary."""
    h, w = image_size
    images = torch.rand(batch_size, 3, int(h), int(w), generator=generator) * 2 - 1
    labels = None
    if num_classes is not None:
        labels = torch.randint(0, int(num_classes), (batch_size,), generator=generator)
    conditions = {}
    for name, spec in sorted(specs.items()):
        if num_classes is not None and not spec.required:
            continue
        rows = spec.rows or condition_tokens
        if spec.dim is None or rows is None:
            what = "width" if spec.dim is None else "row count"
            raise ValueError(f"condition payload '{name}' {spec} has no fixed {what}: "
                             + ("the family must override example_batch" if spec.dim is None
                                else "give --condition-tokens N (rows per sample)"))
        values = torch.randn(batch_size, int(rows), int(spec.dim), generator=generator)
        conditions[name] = Padded(values, torch.full((batch_size,), int(rows), dtype=torch.int64))
    return Batch(labels=labels, images=images, conditions=conditions)
