"""Temporary build folders of killed processes: which are stale, and removing them.

A folder built under a temporary name and renamed when complete (a code cache) is written
as ``.<name>.tmp-<host>-<pid>`` next to its target, so that a later build can tell a
killed build (same host, process gone) from a live one (its process runs, or it is another
host's on a shared file system and changed recently).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
#: a build folder untouched this long is abandoned whoever made it (another host's, an old name)
STALE_AFTER_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process (or not a pid we can judge): keep it
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.iterdir():
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            pass
    return max(times)


def remove_stale_builds(out: str | Path) -> list[Path]:
    """Delete the temporary folders of builds of ``out`` that were killed mid-write.

    A build writes ``.<name>.tmp-<host>-<pid>`` next to ``out``. One is stale when its
    host is this one and its process is gone, or (another host's, or the old
    ``.<name>.tmp-<pid>`` name) when nothing in it changed for :data:`STALE_AFTER_S`. A
    live build, here or on another host sharing the folder, is never touched."""
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")
    for d in out.parent.iterdir():
        m = pattern.match(d.name)
        if m is None or not d.is_dir() or d.is_symlink():
            continue
        pid, host = int(m["pid"]), m["host"]
        try:
            if host == HOST:
                stale = pid != os.getpid() and not _pid_alive(pid)
            else:
                stale = time.time() - _newest_mtime(d) > STALE_AFTER_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
