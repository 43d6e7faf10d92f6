"""What a ``--resume`` may change: the model and the data must stay, the rest is warned.

The run config stored in the checkpoint is compared with the resolved config of the
resuming run, field by field (dotted names). A different model (family, checkpoint
files, adapter overrides) or different data (dataset, split, image size, options) would
continue one run's optimizer state on another problem: that is refused. Every other
changed hyper-parameter is allowed but named, one line each; the ``eval`` section (validation
during training) changes nothing trained and is not compared. Paths are compared as
absolute paths (old runs stored them relative: those are read against the current
working directory).
"""

from __future__ import annotations

from typing import Any

from sar_core.checkpoint_io.hub import is_hub_ref
from sar_core.train.config import absolute

#: fields a resume must keep
IDENTITY = ("model.family", "model.tokenizer", "model.backbone", "model.overrides", "model.resize_classes",
            "data.name", "data.split", "data.image_size", "data.options")
#: fields that change nothing about what is trained
NOT_HYPER = ("out", "resume", "accept_data_change", "data.workers", "train.loggers", "train.log_every",
             "model.sources", "train.save_format")
_PATHS = ("model.tokenizer", "model.backbone")


class ResumeMismatch(Exception):
    """The resuming run's model or data differ from the checkpoint's."""


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {'optim.lr': ..., 'model.overrides': {...}} (two levels)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not prefix:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _norm(key: str, value: Any) -> Any:
    if value is None:
        return None
    if key in _PATHS:
        return value if is_hub_ref(value) else str(absolute(value))
    if isinstance(value, tuple):
        return list(value)
    return value


def _same_data_name(old: Any, new: Any) -> bool:
    return old == new or str(absolute(old)) == str(new)


def compare(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for resuming a run saved with ``saved`` as ``now`` (to_dict())."""
    a, b = flatten(saved), flatten(now)
    refusals, warnings = [], []
    for key in sorted(set(a) | set(b)):
        if key in NOT_HYPER or key.startswith("eval."):  # validation changes nothing about the training
            continue
        old, new = _norm(key, a.get(key)), _norm(key, b.get(key))
        if old == new or (key == "data.name" and old is not None and new is not None
                          and _same_data_name(old, new)):
            continue
        if key in IDENTITY:
            refusals.append(f"{key} is {old!r} in the run but {new!r} now")
        else:
            warnings.append(f"--resume: {key} changed from {old!r} to {new!r}")
    if a.get("train.batch_size") != b.get("train.batch_size") and a.get("optim.lr") == b.get("optim.lr"):
        warnings.append(f"--resume: optim.lr stays the run's {b.get('optim.lr')!r}, not rescaled to the new "
                        "batch size (pass --lr to change it)")
    return refusals, warnings


def check(saved: dict, now: dict, out_dir: str) -> list[str]:
    """Raise ResumeMismatch (one line) if model / data differ; return the warnings."""
    refusals, warnings = compare(saved, now)
    if refusals:
        raise ResumeMismatch(f"cannot resume {out_dir}: " + "; ".join(refusals)
                             + ": resume with the run's own model and data flags (or none), "
                             "or start a new run with another --out")
    return warnings
