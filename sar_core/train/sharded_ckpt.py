"""Sharded run checkpoints of FSDP2 runs, through ``torch.distributed.checkpoint`` (DCP).

An FSDP2 run saves ``checkpoints/step_00001000.dcp/``: a folder in which every rank writes
its own shards of the model, the optimizer state and the EMA (``__<rank>_0.distcp``,
nothing is gathered), rank 0 writes DCP's index (``.metadata``) and ``state.pt``, the
rest of the run state (step, data position, RNG streams of every rank, schedule sampler,
non-finite guard, loss scaler, the optimizer's param groups, the EMA's decay, lr, config)
as a plain ``torch.save`` file. The folder is written under a temporary name in the same
folder (``.step_00001000.dcp.<random>.tmp``), every file fsync'ed, ``state.pt`` last, and
renamed into place by rank 0 once every rank's shards are written: a crash mid-save
leaves the previous checkpoints as they were, and the next run clears the temporary
folder (:func:`~sar_core.train.checkpointing.clean_interrupted_writes`).

Loading reshards: each rank reads the pieces of the saved tensors that its own shards (or,
in a single process or under DDP, its whole tensors) cover, so a checkpoint written by N
ranks resumes on any number of ranks. :func:`read_full` reads one whole, in one process
(``sar export-checkpoint``, tests).

Checkpoints are untrusted. DCP reads each tensor with ``torch.load(weights_only=True)``,
but unpickles its ``.metadata`` index with plain :mod:`pickle` and non-tensor entries with
``torch.load(weights_only=False)``. Here the index is unpickled by an unpickler that
resolves only DCP's own metadata classes, ``torch.Size``, dtypes and paths (anything else,
e.g. a callable smuggled into the file, is refused before it is called); every file it
names must be a plain name inside the folder; and entries that are not tensors are
refused (sar never writes any), so no pickled object of the file is ever executed.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import WriteError, atomic_save, dir_mode, fsync_dir, load_file, write_error
from sar_core.train import distributed as D

SUFFIX = ".dcp"
STATE = "state.pt"
SEP = "/"  # joins part / parameter name / state name into DCP's flat keys (names use dots)


# ----------------------------------------------------------------------------- flat keys
def flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{"model": {name: t}, "optimizer": {name: {"exp_avg": t}}}`` -> ``{"model/name": t, ...}``;
    every leaf must be a tensor (DCP would pickle anything else)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        key = str(key)
        if SEP in key:
            raise ValueError(f"state key {key!r} contains {SEP!r}")
        name = prefix + key
        if isinstance(value, dict):
            out.update(flatten(value, name + SEP))
        elif isinstance(value, torch.Tensor):
            out[name] = value
        else:
            raise TypeError(f"sharded state entry {name} is a {type(value).__name__}, not a tensor")
    return out


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *heads, last = name.split(SEP)
        node = tree
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = value
    return tree


def present(tree: dict, keys: set, prefix: str) -> dict:
    """``tree`` without the leaves whose flat key (under ``prefix``) is not in ``keys``
    (e.g. the optimizer state of parameters that had none when the checkpoint was written)."""
    out: dict = {}
    for key, value in tree.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            sub = present(value, keys, name + SEP)
            if sub:
                out[key] = sub
        elif name in keys:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- safe reading
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_META, n) for n in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                  "TensorStorageMetadata", "ChunkStorageMetadata", "BytesStorageMetadata",
                                  "_MEM_FORMAT_ENCODING")}
_ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
             ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("pathlib", "PureWindowsPath"), ("pathlib", "Path")}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves DCP's metadata classes, torch.Size, dtypes and paths; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the index names {module}.{name}, which a DCP index never holds")


def read_index(folder: Path):
    """DCP's ``.metadata`` of ``folder``, unpickled safely and checked (CheckpointError if not)."""
    from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as fh:
            md = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no .metadata (not a complete sharded checkpoint)") from None
    except Exception as exc:
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(md, Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path} is not a DCP index")
    bad = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if bad:
        raise CheckpointError(f"{path}: entries {', '.join(map(str, bad[:4]))} are not tensors; a sar "
                              "checkpoint holds tensors only (refused: they would be unpickled)")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or rel != os.path.basename(rel) or rel in (".", "..") \
                or not (Path(folder) / rel).is_file():
            raise CheckpointError(f"{path} names a data file {rel!r} that is not a file of the checkpoint folder")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{path}: transformed (e.g. compressed) entries are not supported")
    return md


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            md = read_index(Path(folder))
            from torch.distributed.checkpoint.metadata import StorageMeta

            md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(folder)


def _planner():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not a tensor (refused)")

    return TensorsOnly()


def _dcp_errors() -> tuple:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    return (Exception, CheckpointException)


def _first_cause(exc: BaseException) -> BaseException:
    """The error behind DCP's CheckpointException (it collects every rank's)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return exc


@contextmanager
def _quiet() -> Iterator[None]:
    """Without DCP's warning that one process saves / loads alone (that is meant here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


# ----------------------------------------------------------------------------- write
def write(final: Path, tensors: dict, payload: dict, env: D.DistEnv) -> Optional[Path]:
    """Write the sharded checkpoint folder ``final`` atomically (every rank calls it):
    ``tensors`` (each rank's shards, a tree of tensors / DTensors) through DCP, ``payload``
    (rank 0's) as ``state.pt``. Returns ``final`` on rank 0; raises WriteError on every rank
    when any rank's write failed (the temporary folder is removed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    final = Path(final)
    tmp, err = None, None
    if env.is_main:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            os.chmod(tmp, dir_mode())  # mkdtemp's is private (0700)
        except OSError as exc:
            err = write_error(exc, final)
    tmp = D.broadcast_object(None if err else tmp, env)
    if tmp is not None:
        try:
            with _quiet():
                dcp.save(flatten(tensors), no_dist=not env.enabled,
                         storage_writer=FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True))
        except _dcp_errors() as exc:  # DCP raises on every rank when one rank's write failed
            err = write_error(_first_cause(exc), final)
    if env.is_main and tmp is not None:
        try:
            if err is None:
                atomic_save(payload, Path(tmp) / STATE)
                fsync_dir(Path(tmp))
                _replace_dir(Path(tmp), final)
                fsync_dir(final.parent)
        except BaseException as exc:
            err = write_error(exc, final) if isinstance(exc, (OSError, RuntimeError)) else exc
            if not isinstance(exc, Exception):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        if err is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    text = D.broadcast_object(None if err is None else str(err), env)
    if err is not None:
        raise err
    if text is not None:  # rank 0 failed after every rank had written its shards
        raise WriteError(errno.EIO, text)
    return final if env.is_main else None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again) is moved
    aside first and removed after."""
    aside = None
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        os.replace(final, aside / final.name)
    os.replace(tmp, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ----------------------------------------------------------------------------- read
def read_payload(folder: Path) -> dict:
    """``state.pt`` of a sharded checkpoint (weights_only), its index checked too."""
    folder = Path(folder)
    read_index(folder)
    state = load_file(folder / STATE, "run checkpoint state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / STATE}: expected a dict")
    return state


def load_into(folder: Path, tensors: dict, env: D.DistEnv) -> None:
    """Fill ``tensors`` (a tree of this rank's tensors / DTensors, e.g. a freshly built
    model's sharded state dict) in place from the checkpoint ``folder``, resharding (every
    rank calls it). A missing or mis-shaped entry is a CheckpointError."""
    import torch.distributed.checkpoint as dcp

    flat = flatten(tensors)
    try:
        with _quiet():
            dcp.load(flat, storage_reader=_reader(Path(folder)), planner=_planner(), no_dist=not env.enabled)
    except CheckpointError:
        raise
    except _dcp_errors() as exc:
        cause = _first_cause(exc)
        if isinstance(cause, CheckpointError):
            raise cause from exc
        lines = [ln for ln in str(cause).splitlines() if ln.strip()]
        raise CheckpointError(f"cannot read the sharded checkpoint {folder}: "
                              f"{lines[0] if lines else type(cause).__name__}") from exc


def read_full(folder: Path) -> dict:
    """Every tensor of a sharded checkpoint, whole, as a tree (one process; CPU memory for all)."""
    md = read_index(Path(folder))
    flat = {}
    for key, meta in md.state_dict_metadata.items():
        try:
            flat[key] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        except Exception as exc:
            raise CheckpointError(f"{folder}: entry {key} has no valid size / dtype ({exc})") from exc
    tree = unflatten(flat)
    load_into(Path(folder), tree, D.DistEnv())
    return tree
