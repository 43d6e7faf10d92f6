"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM, torchrun and schedulers send).

:class:`StopRequest` turns the first such signal into a flag; the training loop finishes
the step under way, all ranks agree on the flag (it travels in the step's all-reduce),
rank 0 writes a checkpoint and the run exits with :data:`EXIT_SIGNALLED`. In a
single-process run a second signal abandons the step at once (like Ctrl-C: the newest
complete state is kept); in a distributed run repeats are merged, because torchrun
forwards the signal it gets to ranks that may have had it already (``scancel`` signals
every process of the job), and one rank abandoning a step would leave the others waiting.

DataLoader workers leave stop signals (and Ctrl-C) to their main process: a signal sent
to the whole process group (``kill -TERM -PGID``, ``scancel``, a container stop,
torchrun's ``killpg`` of each rank) must not kill a worker mid-step.
:func:`ignore_in_worker` is their ``worker_init_fn``; :func:`held_while_spawning` blocks
the signals while workers are forked, so none reaches a worker before it ignores them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

#: exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (128 + 15)
EXIT_SIGNALLED = 143
#: exit status of a run stopped by Ctrl-C
EXIT_INTERRUPTED = 130

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: what DataLoader workers ignore: the stop signals and Ctrl-C
WORKER_IGNORED = (*STOP_SIGNALS, signal.SIGINT)


def ignore_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: ignore :data:`WORKER_IGNORED` (then let
    through what :func:`held_while_spawning` held back, now ignored)."""
    for s in WORKER_IGNORED:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)


@contextlib.contextmanager
def held_while_spawning() -> Iterator[None]:
    """Block :data:`WORKER_IGNORED` in this thread while DataLoader workers are forked (they
    inherit the mask and ignore the signals before unblocking them); a signal that came
    meanwhile is delivered to this process when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop.requested`` after a stop signal.

    The handler only records the signal (printing from a handler can re-enter a buffered
    write); the training loop reports it."""

    def __init__(self, abandon_on_repeat: bool = True):
        """``abandon_on_repeat``: a second signal raises KeyboardInterrupt (single process);
        False merges repeats into the first (distributed runs)."""
        self.signum: Optional[int] = None
        self.abandon_on_repeat = abandon_on_repeat
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if self.abandon_on_repeat:
                raise KeyboardInterrupt  # a second signal: abandon the step now
            return
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
