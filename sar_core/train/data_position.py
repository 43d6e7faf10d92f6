"""The data-position part of a run: where the :class:`~sar_core.data.datasets.BatchStream`
stands (epoch, batch within the epoch) and the layout that position is valid for.

A position means the same items only for the same ranks, micro-batch and seed; a resume
under another layout restarts the data at the next epoch (with a warning) and records that
in :attr:`DataPosition.layout_kept`, which the RNG part reads.
"""

from __future__ import annotations

from typing import Callable, Optional

from sar_core.data.datasets import BatchStream


class DataPosition:
    def __init__(self, stream: BatchStream, seed: int, micro_batch: int, world_size: int,
                 log: Callable[[str], None]):
        self.stream, self.log = stream, log
        self.layout = {"seed": seed, "micro_batch": micro_batch, "world_size": world_size}
        self.layout_kept = True

    def capture(self) -> dict:
        """The position now (for a snapshot at the start of a step)."""
        return self.stream.position()

    def state_dict(self, captured: Optional[dict] = None) -> dict:
        return {**(captured if captured is not None else self.capture()), **self.layout}

    def load_state_dict(self, state: dict) -> None:
        self.layout_kept = all(state.get(k) == v for k, v in self.layout.items())
        if self.layout_kept:
            self.stream.set_position(state["epoch"], state["batch"])
        else:
            self.log("[yellow]warning:[/] ranks, batch or seed changed since the checkpoint: the data "
                     f"restarts at the next epoch ({int(state['epoch']) + 1}); RNG streams are reseeded")
            self.stream.set_position(int(state["epoch"]) + 1, 0)
