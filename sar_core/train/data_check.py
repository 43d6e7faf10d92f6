"""Whether a resumed run reads the data it started on: a cheap fingerprint of the data.

``--resume`` compares the data's name, split and options (:mod:`sar_core.train.resume_check`),
but a folder's contents may change under the same path (images added, a code cache
rebuilt). A run records, in ``OUT/data.json``, the number of dataset items and, for data
read from a folder (an image folder, ``NAME:FOLDER``, a code cache), the number of files
and a sha256 over their relative paths and sizes (names and sizes only: one directory walk
with a stat per file, no file is read). A resume whose fingerprint differs is refused with
one line; ``--accept-data-change`` continues on the new contents (and records them).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from sar_core.train.resume_check import ResumeMismatch

FILE = "data.json"


def folder_of(spec: str, dataset_names) -> Optional[Path]:
    """The folder a ``--data`` spec reads: the path itself, or FOLDER of ``NAME:FOLDER``."""
    from sar_core.data.datasets import dataset_at

    at = dataset_at(spec, dataset_names)
    root = Path(at[1]) if at else Path(spec)
    return root if str(spec) not in dataset_names and root.is_dir() else None


def fingerprint(spec: str, num_items: int, dataset_names) -> dict:
    """{'data', 'items'[, 'folder', 'files', 'sha256']} of the training data."""
    out: dict = {"data": str(spec), "items": int(num_items)}
    root = folder_of(spec, dataset_names)
    if root is None:
        return out
    h, files = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(f for f in filenames if not f.startswith(".")):
            p = Path(dirpath) / name
            try:
                size = p.stat().st_size
            except OSError:
                continue
            h.update(f"{p.relative_to(root).as_posix()}|{size}\n".encode())
            files += 1
    out.update(folder=str(root.resolve()), files=files, sha256=h.hexdigest())
    return out


def read(out_dir: Path) -> Optional[dict]:
    try:
        return json.loads((Path(out_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None


def record(out_dir: Path, fp: dict) -> None:
    from sar_core.checkpoint_io import atomic_write_text

    atomic_write_text(json.dumps(fp, indent=2), Path(out_dir) / FILE)


def _what_changed(old: dict, new: dict) -> str:
    parts = []
    if old.get("items") != new.get("items"):
        parts.append(f"{old.get('items')} items then, {new.get('items')} now")
    if old.get("files") != new.get("files"):
        parts.append(f"{old.get('files')} files then, {new.get('files')} now")
    if not parts:
        parts.append("same counts, but file names or sizes differ")
    return "; ".join(parts)


def check_resumed(out_dir: Path, fp: dict, accept: bool, write: bool, log: Callable[[str], None]) -> None:
    """On resume: refuse (ResumeMismatch, one line) if the data's fingerprint differs from
    the one recorded at the start, unless ``accept``; a run without a record gets one."""
    saved = read(out_dir)
    if saved is not None and saved == fp:
        return
    if saved is not None and not accept:
        raise ResumeMismatch(f"cannot resume {out_dir}: the training data {fp['data']} changed since the run "
                             f"started ({_what_changed(saved, fp)}; recorded in {Path(out_dir) / FILE}); "
                             "resume on the data it started with, pass --accept-data-change to continue on "
                             "the new contents, or --restart to start over on them")
    if saved is not None:
        log(f"[yellow]warning:[/] --accept-data-change: the training data changed ({_what_changed(saved, fp)}); "
            "continuing on the new contents")
    if write:
        record(out_dir, fp)
