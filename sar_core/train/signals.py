"""Graceful stop on SIGTERM / SIGUSR1 (what SLURM, torchrun and schedulers send).

:class:`StopRequest` turns the first such signal into a flag; the training loop finishes
the step under way, all ranks agree on the flag (it travels in the step's all-reduce),
rank 0 writes a checkpoint and the run exits with :data:`EXIT_SIGNALLED`. A second
signal abandons the step at once (like Ctrl-C: the newest complete state is kept).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

#: exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint (128 + 15)
EXIT_SIGNALLED = 143
#: exit status of a run stopped by Ctrl-C
EXIT_INTERRUPTED = 130

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """``with StopRequest() as stop:`` ... ``stop.requested`` after a stop signal.

    The handler only records the signal (printing from a handler can re-enter a buffered
    write); the training loop reports it."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # a second signal: abandon the step now
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
