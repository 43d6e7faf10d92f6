"""Scale schedules: which token grids a scale-wise model predicts, in which order.

A schedule is an ordered tuple of (h, w) token grids, coarsest first. Scale k owns the
tokens ``offsets[k] : offsets[k + 1]`` of the flattened sequence (row-major inside a
scale). The attention patterns of the adapter contract (``ATTENTION_PATTERNS``): the
block-causal mask lets a token attend to every token of its own scale and of every
coarser scale, never to a finer one; the within-scale mask to its own scale only.

Square schedules (VAR, FlexVAR) are written as side lengths ``(1, 2, 3, 4)``; non-square
ones (Infinity) as pairs ``((1, 1), (1, 2), (2, 4))``. Both normalise to pairs.
A schedule is immutable and hashable, so it can key caches of masks or positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence, Union

import torch

ScaleLike = Union[int, Sequence[int]]

#: the attention patterns the adapter contract supports (``ScaleWiseAdapter.attention``)
ATTENTION_PATTERNS = ("block-causal", "within-scale")


def _as_hw(scale: ScaleLike) -> tuple[int, int]:
    if isinstance(scale, int) or (hasattr(scale, "ndim") and scale.ndim == 0):
        side = int(scale)
        return side, side
    items = [int(v) for v in scale]
    if len(items) == 3:  # Infinity writes (t, h, w) with t == 1 for images
        if items[0] != 1:
            raise ValueError(f"temporal scales are not supported: {tuple(items)}")
        items = items[1:]
    if len(items) != 2:
        raise ValueError(f"a scale is an int side or an (h, w) pair, got {scale!r}")
    return items[0], items[1]


@dataclass(frozen=True)
class Schedule:
    """An ordered list of per-scale token grids ``(h, w)``, coarsest first."""

    scales: tuple[tuple[int, int], ...]

    def __init__(self, scales: Iterable[ScaleLike]):
        hw = tuple(_as_hw(s) for s in scales)
        if not hw:
            raise ValueError("a schedule needs at least one scale")
        for h, w in hw:
            if h < 1 or w < 1:
                raise ValueError(f"scale sides must be positive, got {(h, w)}")
        object.__setattr__(self, "scales", hw)

    # -- sizes -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.scales)

    def __iter__(self):
        return iter(self.scales)

    def __getitem__(self, k: int) -> tuple[int, int]:
        return self.scales[k]

    @property
    def is_square(self) -> bool:
        return all(h == w for h, w in self.scales)

    @property
    def sides(self) -> tuple[int, ...]:
        """Side lengths of a square schedule (raises on a non-square one)."""
        if not self.is_square:
            raise ValueError(f"schedule {self} is not square")
        return tuple(h for h, _ in self.scales)

    @cached_property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """``offsets[k]`` is the first token of scale k; ``offsets[-1] == L``."""
        out = [0]
        for n in self.token_counts:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def first_len(self) -> int:
        return self.token_counts[0]

    def slice(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])

    # -- masks -------------------------------------------------------------------------
    def scale_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L,) int64: the scale index of every token."""
        counts = torch.tensor(self.token_counts, device=device)
        return torch.repeat_interleave(torch.arange(len(self), device=device), counts)

    def attention_mask(self, device: torch.device | str | None = None,
                       pattern: str = "block-causal") -> torch.Tensor:
        """(L, L) bool, True where query token a may attend to key token b under
        ``pattern`` (one of ``ATTENTION_PATTERNS``)."""
        ids = self.scale_ids(device)
        if pattern == "block-causal":
            return ids[None, :] <= ids[:, None]
        if pattern == "within-scale":
            return ids[None, :] == ids[:, None]
        raise ValueError(f"unknown attention pattern {pattern!r}; one of {', '.join(ATTENTION_PATTERNS)}")

    def attention_bias(self, device=None, dtype: torch.dtype = torch.float32,
                       pattern: str = "block-causal") -> torch.Tensor:
        """(1, 1, L, L) additive mask: 0 where allowed, -inf where not (upstream layout)."""
        allowed = self.attention_mask(device, pattern)
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        bias.masked_fill_(~allowed, float("-inf"))
        return bias[None, None]

    # -- conversions -------------------------------------------------------------------
    def sub(self, ks: Sequence[int]) -> "Schedule":
        return Schedule([self.scales[k] for k in ks])

    def first(self, j: int) -> "Schedule":
        """The first ``j`` scales (1 <= j <= len)."""
        if not 1 <= j <= len(self):
            raise ValueError(f"first({j}) of a {len(self)}-scale schedule")
        return Schedule(self.scales[:j])

    def to_list(self) -> list:
        """JSON-friendly: side ints for a square schedule, [h, w] pairs otherwise."""
        if self.is_square:
            return list(self.sides)
        return [list(s) for s in self.scales]

    def __str__(self) -> str:
        if self.is_square:
            return "_".join(str(s) for s in self.sides)
        return "_".join(f"{h}x{w}" for h, w in self.scales)

    @classmethod
    def parse(cls, text: "str | Sequence[ScaleLike] | Schedule") -> "Schedule":
        """Accept ``"1_2_3"``, ``"1,2,3"``, ``"1x1,2x3"`` or a sequence."""
        if isinstance(text, Schedule):
            return text
        if not isinstance(text, str):
            return cls(text)
        parts = [p for p in text.replace(",", "_").replace(" ", "").split("_") if p]
        scales: list[ScaleLike] = []
        for p in parts:
            if "x" in p:
                h, w = p.split("x", 1)
                scales.append((int(h), int(w)))
            else:
                scales.append(int(p))
        return cls(scales)


class ScheduleSampler:
    """Produces the schedule of each training step.

    The base class always returns one fixed schedule. Plugins (registered through
    ``register_schedules``) subclass it to draw a schedule per step, e.g. FlexVAR's random
    schedules; they must draw only from ``rng`` so that resumed runs replay the same
    sequence. ``state_dict``/``load_state_dict`` carry the RNG state across checkpoints.
    """

    def __init__(self, default: Schedule, seed: int = 0):
        self.default = default
        self.rng = random.Random(seed)

    def sample(self) -> Schedule:
        return self.default

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        st = state["rng"]
        # JSON / torch round-trips turn the inner tuple into a list
        self.rng.setstate((st[0], tuple(st[1]), st[2]))
