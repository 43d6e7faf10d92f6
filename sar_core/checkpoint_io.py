"""Safe reading and atomic writing of checkpoint files.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``,
which refuses arbitrary pickled objects. Writes go to a temporary file in the same folder,
are fsync'ed, then renamed over the target, so a crash never leaves a truncated file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sar_core.adapter import CheckpointError


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True, map_location='cpu')`` with clear errors."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{what} file not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{what} path is a folder, expected a file: {p}")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file as st_load
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise CheckpointError(f"{p}: reading .safetensors needs the 'safetensors' package") from exc
        return st_load(str(p))
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read {what} {p}: {msg}. The file is corrupted, truncated, "
                              "or holds pickled Python objects that weights_only loading refuses.") from exc


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (temp file, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
        _fsync_dir(p.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def atomic_write_text(text: str, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwrap_state_dict(obj: Any, nested_paths: tuple[tuple[str, ...], ...], what: str) -> tuple[dict, tuple[str, ...]]:
    """Find the tensor dict inside a loaded checkpoint.

    Tries each key path of ``nested_paths`` (e.g. ``("trainer", "var_wo_ddp")``) and finally
    the object itself. Returns (state_dict, path used; () for a plain state dict).
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what}: expected a dict of tensors, got {type(obj).__name__}")
    for path in nested_paths:
        cur = obj
        for key in path:
            if not isinstance(cur, dict) or key not in cur:
                break
            cur = cur[key]
        else:
            if isinstance(cur, dict):
                return dict(cur), path
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), ()
    keys = ", ".join(list(map(str, obj))[:8])
    raise CheckpointError(f"{what}: no state dict found (top-level keys: {keys}); expected a plain "
                          f"state dict or one nested under {' / '.join('.'.join(p) for p in nested_paths)}")


def strip_prefix(sd: dict, prefix: str) -> dict:
    """Drop a wrapper prefix such as ``module.`` (DDP) or ``_orig_mod.`` (torch.compile)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def check_keys(sd: dict, expected: dict, what: str, family_hint: str, ignore: tuple[str, ...] = ()) -> None:
    """Raise one CheckpointError listing missing / unexpected / mis-shaped keys."""
    def ignored(k: str) -> bool:
        return any(k == i or k.endswith("." + i) or k.endswith(i) for i in ignore)

    missing = sorted(k for k in expected if k not in sd and not ignored(k))
    unexpected = sorted(k for k in sd if k not in expected and not ignored(k))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                    for k in sd if k in expected and not ignored(k)
                    and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or shapes):
        return
    parts = [f"{what} does not match {family_hint}."]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" ... (+{len(items) - 12} more)" if len(items) > 12 else ""
            parts.append(f"{title} ({len(items)}): " + ", ".join(items[:12]) + more)
    raise CheckpointError("\n".join(parts))
