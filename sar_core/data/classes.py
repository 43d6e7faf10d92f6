"""The class count of the training data against the model's, checked before training.

A class-labelled dataset says how many classes it has through a ``num_classes`` member
(the image folder: its class folders, or its class map; a code cache: from its labels).
:func:`check_classes` compares it with ``adapter.num_classes`` and refuses, naming both
numbers and the two ways out, when the data has more classes than the model: label K of a
K-class model is the null class used for guidance, so training on it would be silently
wrong. ``resize=True`` (``model.resize_classes``) resizes the class embedding instead
(:meth:`sar_core.adapter.ScaleWiseAdapter.resize_classes`).

Class map file (``--class-map FILE``, option ``class_map`` of the image folder): one class
folder a line, optionally followed by the model label to train it as; unlisted folders are
skipped; ``#`` starts a comment::

    n01440764 0         # folder n01440764 is the model's class 0
    n01443537 1
    my_new_class        # no label: the line's index among the listed classes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol, runtime_checkable


@runtime_checkable
class ClassLabelled(Protocol):
    """The dataset contract for class labels: labels lie in 0..num_classes-1."""

    num_classes: int


def data_num_classes(dataset: Any) -> Optional[int]:
    """The dataset's class count, or None for a dataset that does not say."""
    return int(dataset.num_classes) if isinstance(dataset, ClassLabelled) else None


def read_class_map(path: str | Path) -> dict[str, int]:
    """A class map file -> {folder name: model label} (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"class map file not found: {p}")
    out: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        parts = raw.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) > 2 or (len(parts) == 2 and not parts[1].lstrip("-").isdigit()):
            raise ValueError(f"{p}:{n}: expected 'FOLDER' or 'FOLDER LABEL', got {raw.strip()!r}")
        if parts[0] in out:
            raise ValueError(f"{p}:{n}: class folder {parts[0]!r} listed twice")
        label = int(parts[1]) if len(parts) == 2 else len(out)
        if label < 0:
            raise ValueError(f"{p}:{n}: labels must be >= 0, got {label}")
        out[parts[0]] = label
    if not out:
        raise ValueError(f"class map {p} lists no classes")
    return out


def check_classes(data_classes: Optional[int], adapter, resize: bool, where: str,
                  log: Callable[[str], None] = print) -> None:
    """Refuse (or, with ``resize``, resize the model for) data with more classes than the model."""
    model_classes = adapter.num_classes
    if model_classes is None or data_classes is None:
        if resize:
            raise ValueError("model.resize_classes needs a class-conditional model and a dataset that says "
                             "how many classes it has")
        return
    if resize and data_classes != model_classes:
        adapter.resize_classes(int(data_classes))
        log(f"resized the class embedding of '{adapter.name}' from {model_classes} to {data_classes} classes "
            "(new rows freshly initialised, the null class kept last)")
        return
    if data_classes > model_classes:
        raise ValueError(
            f"{where} has {data_classes} classes but the model has {model_classes} (labels 0..{model_classes - 1}; "
            f"label {model_classes} is its null class): pass --class-map FILE to train on a subset / mapping of "
            "the classes, or --resize-classes to grow the class embedding")
    if data_classes < model_classes:
        log(f"note: {where} has {data_classes} classes, the model {model_classes}: data labels are used as "
            "the model's class ids (--class-map FILE maps class folders onto other ids)")
