"""Run checkpoints of ``sar train``: full training state, atomic, keep-last-N, resume.

A run folder keeps ``checkpoints/step_00001000.pt`` files (``.safetensors`` with
``--save-format safetensors``: the same tree, tensors in safetensors, the rest as JSON in
its header; both are read, whichever is newest wins). Each is written atomically
(:func:`sar_core.checkpoint_io.atomic_save`: temp file, fsync, rename), so an interrupted
write leaves the previous checkpoints intact and never a truncated file under the final
name (:func:`remove_stale_tmp` clears what a killed write left). Only the newest
``keep_last`` are kept, plus one protected "good" checkpoint when the run has seen a
non-finite step (see :mod:`sar_core.train.nonfinite`). FSDP2 runs write sharded
``step_N.dcp/`` folders instead (:mod:`sar_core.train.sharded_ckpt`: each rank its own
shards, atomic by folder rename, resumable on any number of ranks). A checkpoint holds everything a resumed run
needs to continue exactly like an uninterrupted one: model, optimizer, EMA, loss scaler,
step (the learning rate is a function of it), data position (epoch, batch within the
epoch, sampler seed), the schedule sampler's state and every RNG (python, numpy, torch
CPU / CUDA, the rollout generator and rollout rng) of every rank.

Everything stored is plain tensors / numbers / strings / lists / dicts, so files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sar_core.adapter import CheckpointError
from sar_core.checkpoint_io import atomic_save, load_file, remove_stale_tmp
from sar_core.train import sharded_ckpt

FORMAT = "sar-run-checkpoint"
VERSION = 1
#: --save-format -> (run checkpoint suffix, exported model suffix)
SUFFIXES = {"pt": (".pt", ".pth"), "safetensors": (".safetensors", ".safetensors")}
_NAME = re.compile(r"^step_(\d+)\.(pt|safetensors|dcp)$")
_TMP_DIR = re.compile(r"^\.step_\d+\.dcp\.[A-Za-z0-9_]+\.tmp$")


def last_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's message (for one-line reports)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def checkpoint_path(ckpt_dir: str | Path, step: int, fmt: str = "pt") -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}{SUFFIXES[fmt][0]}"


def sharded_path(ckpt_dir: str | Path, step: int) -> Path:
    """The sharded (FSDP2) checkpoint folder of ``step``."""
    return Path(ckpt_dir) / f"step_{step:08d}{sharded_ckpt.SUFFIX}"


def is_sharded(path: str | Path) -> bool:
    return Path(path).suffix == sharded_ckpt.SUFFIX and Path(path).is_dir()


def step_checkpoint(ckpt_dir: str | Path, step: int) -> Path:
    """The checkpoint file of ``step`` in whichever format it was written (else its .pt name)."""
    found = [p for s, p in list_checkpoints(ckpt_dir) if s == step]
    return found[-1] if found else checkpoint_path(ckpt_dir, step)


def export_path(out_dir: str | Path, name: str = "backbone", fmt: str = "pt") -> Path:
    """``backbone.pth`` (the family's upstream layout) or ``backbone.safetensors`` (plain state dict)."""
    return Path(out_dir) / f"{name}{SUFFIXES[fmt][1]}"


def exported(out_dir: str | Path, name: str = "backbone") -> Optional[Path]:
    """The exported model file of a finished run (either format), or None."""
    for fmt in SUFFIXES:
        if export_path(out_dir, name, fmt).is_file():
            return export_path(out_dir, name, fmt)
    return None


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (file, or sharded folder), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and (p.is_dir() and not p.is_symlink() if m.group(2) == "dcp" else p.is_file()):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep_last: int,
                    protect: Optional[int] = None, fmt: str = "pt") -> Path:
    """Write ``state`` atomically as the checkpoint of ``step`` (``fmt``: pt | safetensors);
    prune older ones (never the checkpoint of step ``protect``)."""
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), **state}
    path = atomic_save(payload, checkpoint_path(ckpt_dir, step, fmt))
    prune(ckpt_dir, keep_last, protect)
    return path


def save_sharded_checkpoint(tensors: dict, rest: dict, ckpt_dir: str | Path, step: int, keep_last: int,
                            env, protect: Optional[int] = None) -> Optional[Path]:
    """Write the sharded checkpoint of ``step`` (every rank calls it): ``tensors`` (each part's
    shards) through DCP, ``rest`` (rank 0's) as its ``state.pt``; rank 0 prunes. Its path
    on rank 0."""
    payload = {"format": FORMAT, "version": VERSION, "step": int(step), "sharded": sorted(tensors), **rest}
    path = sharded_ckpt.write(sharded_path(ckpt_dir, step), tensors, payload, env)
    if env.is_main:
        prune(ckpt_dir, keep_last, protect)
    return path


def remove_checkpoint(path: Path) -> None:
    if is_sharded(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def prune(ckpt_dir: str | Path, keep_last: int, protect: Optional[int] = None) -> None:
    found = list_checkpoints(ckpt_dir)
    for step, p in found[: max(len(found) - keep_last, 0)]:
        if step != protect:
            remove_checkpoint(p)


def first_nonfinite(tensors, buffers: frozenset[str] = frozenset()) -> Optional[tuple[str, str]]:
    """(name, "NaN" | "an infinity") of the first floating-point tensor of ``tensors`` (a
    state dict or ``(name, tensor)`` pairs) that is not finite; None when all are. Entries
    named in ``buffers`` may hold infinities (an additive attention mask's -inf is by
    design) and fail only on NaN. A sharded tensor is checked on this rank's shard."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    for name, v in items:
        if not (isinstance(v, torch.Tensor) and v.is_floating_point()):
            continue
        v = v.to_local() if hasattr(v, "to_local") else v
        if bool(torch.isnan(v).any()):
            return name, "NaN"
        if name not in buffers and not bool(torch.isfinite(v).all()):
            return name, "an infinity"
    return None


def weights_finite(model_state: dict, buffers: frozenset[str] = frozenset()) -> bool:
    """True when every floating-point tensor of a state dict is finite (``buffers``: see
    :func:`first_nonfinite`)."""
    return first_nonfinite(model_state, buffers) is None


def clean_interrupted_writes(ckpt_dir: str | Path) -> list[Path]:
    """Remove temp files (and temp folders of sharded saves) of checkpoint writes that a
    killed process left behind. Only while no other process writes there (run-folder lock)."""
    removed = remove_stale_tmp(ckpt_dir)
    d = Path(ckpt_dir)
    for p in (d.iterdir() if d.is_dir() else ()):
        if _TMP_DIR.match(p.name) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | Path) -> dict:
    """A run checkpoint's state: the whole of a file; of a sharded folder its ``state.pt``
    (``sharded`` names the parts left in the shards: :func:`load_full`, or the checkpointer)."""
    state = sharded_ckpt.read_payload(Path(path)) if is_sharded(path) else load_file(path, "run checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sar train checkpoint (it may be an upstream model file; "
                              "pass it as --backbone instead)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not {VERSION}")
    return state


def load_full(path: str | Path) -> dict:
    """A run checkpoint with every part whole (a sharded one read in this process, its
    optimizer state keyed by parameter name as FSDP2's full state dicts are)."""
    state = load_checkpoint(path)
    if not state.get("sharded"):
        return state
    tensors = sharded_ckpt.read_full(Path(path))
    if "model" in tensors:
        state["model"] = tensors["model"]
    if "optimizer" in tensors:
        state["optimizer"] = {"state": tensors["optimizer"], "param_groups": state.get("optimizer") or []}
    if "ema" in tensors:
        state["ema"] = {**(state.get("ema") or {}), "shadow": tensors["ema"]}
    return state


def load_latest(ckpt_dir: str | Path, warn=print, errors: Optional[list] = None) -> Optional[dict]:
    """The newest readable checkpoint (falling back to older ones with a warning); each
    unreadable one is appended to ``errors`` as (path, exception)."""
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"skipping unreadable checkpoint {path}: {exc}")
            if errors is not None:
                errors.append((path, exc))
            continue
        state["path"] = str(path)
        return state
    return None


# ----------------------------------------------------------------------------- RNG
def capture_rng(generator: Optional[torch.Generator] = None, rollout_rng: Optional[random.Random] = None) -> dict:
    """Every RNG state of this process, in weights_only-loadable form."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    if rollout_rng is not None:
        state["rollout_rng"] = rollout_rng.getstate()
    return state


def _py_state(st: Any) -> tuple:
    return (st[0], tuple(st[1]), st[2])


def restore_rng(state: dict, generator: Optional[torch.Generator] = None,
                rollout_rng: Optional[random.Random] = None) -> None:
    random.setstate(_py_state(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    if rollout_rng is not None and "rollout_rng" in state:
        rollout_rng.setstate(_py_state(state["rollout_rng"]))
