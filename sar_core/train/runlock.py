"""An exclusive lock on a run folder: one ``sar train`` per ``--out`` at a time.

The lock is ``fcntl.flock`` on ``<out>/.lock``, held for the whole run by the process
that writes (rank 0). The file records who holds it (pid, host, start time, command) so a
second run on the same folder, or a ``--resume`` onto a live run, fails at once naming
the holder. The kernel drops the lock when its holder dies, however it dies; a file that
still names a holder while nobody holds the lock is a stale lock: it is taken over with a
note. On release the file is emptied, not deleted (deleting would let two newcomers lock
two different files).

The lock file is opened with ``O_NOFOLLOW`` and must be a regular file with one link:
anyone who can write a shared run folder could otherwise point ``.lock`` at a file of
the person running there, which the run would then truncate. ``sar train`` takes the
lock first, before the model and data are built, so a second run on a live folder fails
in seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from sar_core.train import distributed as D
from sar_core.checkpoint_io import file_mode, remove_stale_tmp
from sar_core.train.checkpointing import clean_interrupted_writes

LOCK_NAME = ".lock"


class RunLockError(Exception):
    """The run folder is locked by a live run, or cannot be locked at all."""


def _holder_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(info.get("started", 0))))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (started {started}: {info.get('command', '?')})"


def _read_info(fd: int) -> Optional[dict]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    if not raw.strip():
        return None
    try:
        info = json.loads(raw)
    except ValueError:
        return {"pid": "?", "host": "?", "command": "unreadable lock file"}
    return info if isinstance(info, dict) else {"pid": "?", "host": "?", "command": "unreadable lock file"}


class RunLock:
    """``with RunLock(out, note=print):`` holds ``out/.lock`` until the block ends."""

    def __init__(self, out_dir: str | Path, note: Callable[[str], None] = print):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.note = note
        self.fd: Optional[int] = None

    def _not_a_lock_file(self, st: os.stat_result) -> Optional[str]:
        """Why an existing ``.lock`` must not be opened for writing, or None."""
        if stat.S_ISLNK(st.st_mode):
            return f"is a symbolic link (to {os.readlink(self.path)}), which sar never follows"
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_nlink > 1:
            return f"has {st.st_nlink} hard links, so it may be another file too"
        return None

    def _refuse(self, why: str) -> RunLockError:
        return RunLockError(f"{self.path} {why}: someone who can write the run folder may have put it there; "
                            "remove it (or choose another --out) and run again")

    def acquire(self) -> "RunLock":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            st = os.lstat(self.path) if os.path.lexists(self.path) else None
        except OSError as exc:
            raise RunLockError(f"cannot write to the run folder {self.out_dir}: {exc.strerror}; choose a "
                               "writable --out (or fix the folder's permissions)") from None
        why = self._not_a_lock_file(st) if st is not None else None
        if why:  # checked before opening: opening a device or FIFO can have effects of its own
            raise self._refuse(why)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
                         | os.O_CLOEXEC, file_mode())
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a link since the check
                raise self._refuse("is a symbolic link, which sar never follows") from None
            raise RunLockError(f"cannot write to the run folder {self.out_dir}: {exc.strerror}; choose a "
                               "writable --out (or fix the folder's permissions)") from None
        why = self._not_a_lock_file(os.fstat(fd))  # what was opened (replaced since the check?)
        if why:
            os.close(fd)
            raise self._refuse(why)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _read_info(fd) or {}
            os.close(fd)
            raise RunLockError(f"{self.out_dir} is in use by another run: {_holder_text(info)}; wait for it "
                               "to finish (or stop it), or choose another --out") from None
        stale = _read_info(fd)
        if stale is not None:
            self.note(f"note: taking over the stale lock of {_holder_text(stale)}: that process is gone")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def held_run_folder(out_dir: Path, ckpt_dir: Path, env: D.DistEnv, log: Callable[[str], None]):
    """Rank 0 holds the run-folder lock for the block (every rank fails together if it
    cannot) and first clears temp files of interrupted writes."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = RunLock(out_dir, note=log).acquire()
        except RunLockError as exc:
            error = str(exc)
    error = D.broadcast_object(error, env)
    if error is not None:
        raise RunLockError(error)
    try:
        if env.is_main:
            stale = clean_interrupted_writes(ckpt_dir) + remove_stale_tmp(out_dir)
            if stale:
                log(f"note: removed {len(stale)} temp file(s) of interrupted writes: "
                    + ", ".join(p.name for p in stale))
        yield
    finally:
        if lock is not None:
            lock.release()
