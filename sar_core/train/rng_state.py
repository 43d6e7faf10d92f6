"""The RNG part of a run: every random stream one rank draws from, as a checkpointable unit.

Three kinds of stream: the process-wide ones (python, numpy, torch CPU / CUDA: dropout,
augmentation), the rollout ``generator`` (sampling inside rollouts, per rank) and the
``rollout_rng`` (which scales a rollout starts at: the same on every rank, so ranks agree
on the step's shape). :meth:`RNGState.capture` reads this rank's streams;
:meth:`RNGState.state_dict` gathers every rank's (a collective: every rank calls it), so a
checkpoint resumes each rank exactly. The streams continue after a resume only where the
data continues too (same ranks, micro-batch and seed, :class:`DataPosition.layout_kept`);
otherwise they stay as seeded for the new layout.
"""

from __future__ import annotations

import random
from typing import Optional

import torch

from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train.builders import derived_seed, seed_all


class RNGState:
    def __init__(self, seed: int, env: D.DistEnv, layout=None):
        """Seed this rank's streams from the run ``seed``; ``layout`` (a DataPosition) says
        whether a loaded checkpoint's streams still apply."""
        self.env, self.layout = env, layout
        seed_all(derived_seed(seed, env.rank, 0))  # per-rank streams (dropout, augmentation)
        self.generator = torch.Generator(device=env.device).manual_seed(derived_seed(seed, env.rank, 1))
        self.rollout_rng = random.Random(derived_seed(seed, 2))  # same on every rank

    def capture(self) -> dict:
        """This rank's streams now (for a snapshot at the start of a step)."""
        return ckpt.capture_rng(self.generator, self.rollout_rng)

    def state_dict(self, captured: Optional[dict] = None) -> list:
        """Every rank's streams, indexed by rank (collective)."""
        return D.all_gather_objects(captured if captured is not None else self.capture(), self.env)

    def load_state_dict(self, rngs: list) -> None:
        kept = self.layout is None or self.layout.layout_kept
        if kept and len(rngs) == self.env.world_size:
            ckpt.restore_rng(rngs[self.env.rank], self.generator, self.rollout_rng)
