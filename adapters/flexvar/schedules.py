"""FlexVAR's random per-step training schedule (upstream ``gen_curr_patch_nums``).

Draw for draw with a ``random.Random`` (same calls, same order as upstream's use of the
global ``random`` module), so ``FlexVARRandomSchedule(seed=s).sample()`` equals upstream's
first schedule after ``random.seed(s)``:

1. with probability 0.05 the official 10-scale list; otherwise [1, 2] + sorted(5 distinct
   sides from 3..10 and 2 from 11..15) + [16];
2. u = random(): each of u > 0.90, 0.95, 0.98, 0.99 removes one more scale at a random
   position in [2, len - 2];
3. while the token count exceeds 680, remove a random one of the last four scales.

The schedules end at side 16 at most, so the latent (image / downsample) must be >= 16.
"""

from __future__ import annotations

import random

from sar_core.schedule import Schedule, ScheduleSampler

from .config import OFFICIAL_PATCH_NUMS

MAX_SIDE = 16
MAX_TOKENS = 680
DROP_THRESHOLDS = (0.90, 0.95, 0.98, 0.99)


def draw_patch_nums(rng: random.Random) -> list[int]:
    if rng.random() < 0.05:
        sides = list(OFFICIAL_PATCH_NUMS)
    else:
        middle = rng.sample(range(3, 11), 5) + rng.sample(range(11, 16), 2)
        middle.sort()
        sides = [1, 2] + middle + [MAX_SIDE]
    u = rng.random()
    for threshold in DROP_THRESHOLDS:
        if u > threshold:
            sides.pop(rng.choice(range(2, len(sides) - 1)))
    while sum(p * p for p in sides) > MAX_TOKENS:
        sides.pop(rng.choice(range(len(sides) - 4, len(sides))))
    return sides


class FlexVARRandomSchedule(ScheduleSampler):
    """A new random FlexVAR schedule every step; replayable through ``state_dict``."""

    def __init__(self, default: Schedule | None = None, seed: int = 0):
        super().__init__(default or Schedule(OFFICIAL_PATCH_NUMS), seed)

    def sample(self) -> Schedule:
        return Schedule(draw_patch_nums(self.rng))
