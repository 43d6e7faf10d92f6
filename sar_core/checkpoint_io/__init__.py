"""Safe reading and atomic writing of checkpoint files.

Checkpoints are untrusted input: they are read with ``torch.load(weights_only=True)``,
which refuses arbitrary pickled objects. Reading memory-maps the file (``mmap=True``;
``.safetensors`` files are mapped by safetensors): a loaded tensor's bytes stay in the
page cache until they are touched, and with :func:`params_on_meta` +
:func:`assign_state` a model is built around the file's tensors instead of copying them
into freshly allocated parameters, so loading a model needs its weights once in RAM, not
twice. Saving writes the tensors as they are (:func:`cpu_state` copies only views of a
larger storage and tensors on another device). Paths may be Hub references
(``hf://OWNER/REPO/FILE[@REVISION]``, :mod:`.hub`) and ``.safetensors`` files (:mod:`.st`).

Writes go to a temporary file in the same folder, are fsync'ed, then renamed over the target, so a crash never leaves a truncated file.
Written files get the permissions of a plain ``open()`` (``0o666`` less the umask), not
``mkstemp``'s private ``0600``, so a team can read each other's runs. A failed write
removes its temporary file and raises :class:`WriteError` naming the file and the cause
(a full disk included, whichever layer reports it); :func:`remove_stale_tmp` clears the
temporary files a killed process left behind.

A contract module (a package only to keep each file short: ``hub`` for ``hf://``
references, ``st`` for ``.safetensors``). May import: the other contract modules only.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

# torch is imported inside the functions that handle tensors: the run config reads hub
# references through this package, and `sar train --help` / completion must not import torch
from sar_core import CheckpointError
from sar_core.checkpoint_io import hub, st
from sar_core.checkpoint_io.hub import is_hub_ref
from sar_core.checkpoint_io.st import is_safetensors

if TYPE_CHECKING:
    import torch


def load_file(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True, map_location='cpu', mmap=True)`` with clear errors.

    ``path`` may be a Hub reference ``hf://OWNER/REPO/FILE[@REVISION]`` (resolved through
    the local hub cache, see :mod:`sar_core.checkpoint_io.hub`) and a ``.safetensors`` file
    (see :mod:`sar_core.checkpoint_io.st`). The tensors returned are views of a private
    (copy-on-write) mapping of the file: nothing is read until it is used, and writing to
    one copies only the pages written. Files in torch's legacy (pre-1.6, non-zip) format
    cannot be mapped and are read whole."""
    import torch

    p = Path(hub.local_path(path))
    if not p.exists():
        raise CheckpointError(f"{what} file not found: {p}")
    if p.is_dir():
        raise CheckpointError(f"{what} path is a folder, expected a file: {p}")
    try:
        if st.is_safetensors(p):
            return st.read(p)
        return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except CheckpointError:
        raise
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot read {what} {p}: {msg}. The file is corrupted, truncated, "
                              "or holds pickled Python objects that weights_only loading refuses.") from exc


@contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, every ``nn.Parameter`` a module registers lives on the meta device (shape
    and dtype, no memory); buffers are built as usual, since many are computed in
    ``__init__`` (attention masks, scale ids) and not stored in checkpoints. Build a model
    here, then fill it with :func:`assign_state`: its parameters become the loaded tensors."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def assign_state(module: torch.nn.Module, sd: dict, what: str) -> None:
    """``module.load_state_dict(sd, strict=False, assign=True)``: the module's parameters and
    buffers named in ``sd`` become ``sd``'s tensors (no copy; a memory-mapped file stays
    mapped), cast only where the file's dtype differs from the module's. Keys must have been
    checked (:func:`check_keys`); a parameter left on the meta device is a CheckpointError."""
    expected = module.state_dict(keep_vars=True)
    cast = {k: (v.to(expected[k].dtype) if k in expected and v.dtype != expected[k].dtype else v)
            for k, v in sd.items()}
    module.load_state_dict(cast, strict=False, assign=True)
    empty = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if empty:
        more = f" ... (+{len(empty) - 8} more)" if len(empty) > 8 else ""
        raise CheckpointError(f"{what}: no values for {', '.join(empty[:8])}{more}")


def _owns_storage(t: torch.Tensor) -> bool:
    return t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def cpu_state(sd: dict) -> dict:
    """A state dict ready for ``torch.save``, without copying what need not be copied: CPU
    tensors that own their storage are saved as they are (torch.save writes a storage from
    its own memory); views of a larger storage are compacted (torch.save would write the
    whole storage) and tensors on an accelerator copied to the CPU."""
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if v.device.type != "cpu":
                v = v.cpu()
            elif not _owns_storage(v):
                v = v.clone()
        out[k] = v
    return out


class WriteError(OSError):
    """A file could not be written; the message names the file, the cause and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting
    it, which races with threads creating files meanwhile): Linux's ``/proc/self/status``;
    elsewhere the set-and-restore fallback."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` would give a new folder under the current umask."""
    return 0o777 & ~_umask()


def _free_mb(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free / 2 ** 20
    except OSError:
        return float("nan")


def _errno_of(exc: BaseException):
    """The errno of ``exc`` or of an OSError it was raised from (torch wraps them)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def write_error(exc: BaseException, path: Path) -> WriteError:
    """A one-line WriteError for a failed write of ``path`` (OSError or torch's miniz error).
    Call it before removing a partial file, so that the free space it measures is the
    space the write met."""
    code = _errno_of(exc)
    free = _free_mb(path.parent)
    if code in _DISK_FULL or (code is None and free < 1.0):
        return WriteError(errno.ENOSPC, f"no space left on device writing {path} ({free:.0f} MB free): "
                          "free some space (or lower --keep-last, or choose another --out), then continue "
                          "with --resume")
    if code in _NO_ACCESS:
        return WriteError(code, f"cannot write {path}: {os.strerror(code)}; make the folder writable or "
                          "choose another --out")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return WriteError(code or errno.EIO, f"writing {path} failed: {reason} ({free:.0f} MB free)")


def _atomic_write(path: str | Path, mode: str, write, by_name: bool = False) -> Path:
    """Write through ``write(fh)`` (``write(tmp_path)`` when ``by_name``) into a temp file
    next to ``path``, fsync, rename."""
    p = Path(path)
    tmp = None
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.fchmod(fd, file_mode())
        if by_name:
            os.close(fd)
            write(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, mode) as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, p)
        fsync_dir(p.parent)
    except BaseException as exc:
        # judge the cause while the temp file still holds the space it took: measured after
        # removing it, a full disk looks free and torch's zip-writer message is all one gets
        err = None if isinstance(exc, WriteError) or not isinstance(exc, (OSError, RuntimeError)) \
            else write_error(exc, p)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if err is None:
            raise
        raise err from exc
    return p


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Save ``obj`` to ``path`` atomically (temp file, fsync, rename): ``torch.save``, or a
    safetensors file when ``path`` ends in ``.safetensors`` (see :mod:`.st`)."""
    import torch

    if is_safetensors(path):
        return _atomic_write(path, "wb", lambda tmp: st.write(obj, tmp), by_name=True)
    return _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return _atomic_write(path, "w", lambda fh: fh.write(text))


def atomic_write_bytes(write, path: str | Path) -> Path:
    """``write(fh)`` into a binary temp file next to ``path``, fsync, rename (e.g. a
    matplotlib figure: ``lambda fh: fig.savefig(fh, format="png")``)."""
    return _atomic_write(path, "wb", write)


_TMP = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def remove_stale_tmp(folder: str | Path) -> list[Path]:
    """Delete the temp files of interrupted atomic writes in ``folder`` (not recursive).

    Call it only while no other process writes there (e.g. under the run-folder lock)."""
    d = Path(folder)
    removed = []
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        if _TMP.match(f.name) and f.is_file():
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def fsync_dir(d: Path) -> None:
    """fsync a folder (a rename or a new file in it is durable); best effort."""
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
    import torch

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
    import torch

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


def __getattr__(name: str):
    if name == "NoBackbone":  # a torch module: imported on first use
        from sar_core.checkpoint_io.no_backbone import NoBackbone

        return NoBackbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
