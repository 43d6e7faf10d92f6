"""Output paths checked before the work, and write errors after it as one line.

Every model command that writes files (``sample``, ``eval``, ``diagnose``, ``tokenize``,
``conformance``, ``pretrain``, ``study``) checks each output path before it loads a model
or samples anything: the folder it goes into exists or can be made, a probe file can be
created there, a file path is not a folder (and a folder path not a file), and an image or
plot path has an extension its writer knows. A write that still fails after the work (the
disk filled up meanwhile) is one ``error:`` line, exit status 2, never a traceback.
"""

from __future__ import annotations

import errno
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional


class OutputPathError(ValueError):
    """An output path that cannot be written (one line naming the flag and the fix)."""


def _existing_ancestor(path: Path, flag: str) -> Path:
    """The nearest existing folder at or above ``path`` (refusing a file in the way)."""
    cur = path
    while not cur.exists():
        if cur.parent == cur:
            break
        cur = cur.parent
    if cur.exists() and not cur.is_dir():
        raise OutputPathError(f"{flag} {path}: {cur} is a file, not a folder; choose another {flag}")
    return cur


def _probe(folder: Path, target: Path, flag: str) -> None:
    """Create and remove a file in ``folder``: what a read-only mount or a forbidden folder refuses."""
    probe = folder / f".sar-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        raise OutputPathError(f"{flag} {target}: cannot write in {folder} ({exc.strerror}); make it writable "
                              f"or choose another {flag}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


def writable_file(path: Optional[Path], flag: str) -> None:
    """``path`` can be (re)written as a file: not a folder, its folder writable."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a folder; give a file path")
    _probe(_existing_ancestor(p.parent, flag), p, flag)


def writable_folder(path: Optional[Path], flag: str) -> None:
    """``path`` is, or can be made, a folder whose files can be written."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {p} is a file; give a folder")
    _probe(_existing_ancestor(p, flag), p, flag)


def image_file(path: Optional[Path], flag: str) -> None:
    """A writable file whose extension PIL can write (e.g. .png, .jpg, .webp)."""
    if path is None:
        return
    from PIL import Image

    Image.init()
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise OutputPathError(f"{flag} {path}: PIL cannot write '{ext or '(no extension)'}' images; use a "
                              ".png (or .jpg, .webp, .tif) path")
    writable_file(path, flag)


def plot_file(path: Optional[Path], flag: str) -> None:
    """A writable file whose extension matplotlib can write (none: PNG)."""
    if path is None:
        return
    ext = Path(path).suffix.lower().lstrip(".")
    if ext:
        from matplotlib.figure import Figure

        known = Figure().canvas.get_supported_filetypes()
        if ext not in known:
            raise OutputPathError(f"{flag} {path}: matplotlib cannot write '.{ext}' plots; use one of "
                                  + ", ".join(f".{k}" for k in sorted(known)))
    writable_file(path, flag)


def write_failed(exc: OSError, path: Path, flag: str) -> OutputPathError:
    """One line for a write that failed after the work."""
    where = Path(exc.filename) if getattr(exc, "filename", None) else Path(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputPathError(f"no space left on device writing {where} ({flag}): free some space or choose "
                               f"another {flag}, then run again")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputPathError(f"cannot write {where} ({flag}): {os.strerror(exc.errno)}; choose a writable {flag}")
    reason = (exc.strerror or str(exc)).splitlines()[0] if (exc.strerror or str(exc)) else type(exc).__name__
    return OutputPathError(f"writing {where} ({flag}) failed: {reason}")


@contextmanager
def writing(console, path: Path, flag: str) -> Iterator[None]:
    """Around a write after the work: an OSError becomes one ``error:`` line, exit status 2."""
    from sar_cli._shared import fail

    try:
        yield
    except OSError as exc:
        fail(console, write_failed(exc, path, flag))
