"""NaN / Inf in training inputs: found per item (or per batch) before the tokenizer sees them.

A dataset plugin that yields a NaN pixel would otherwise be tokenised (to some code), and
the run would train on garbage and report success. The trainer's item fetch
(:class:`sar_core.data.datasets.SeededItems`) and the code-cache builder check every item;
:class:`NonFiniteItem` names the item's index.
"""

from __future__ import annotations

from typing import Any

import torch


class NonFiniteItem(ValueError):
    """A dataset item holds NaN / Inf pixels (or payload values): training on it would
    tokenise garbage and report success."""


def check_finite(item: Any, index: int) -> Any:
    """``item`` unchanged, or :class:`NonFiniteItem` naming its index and where the
    non-finite values are (the image, or a condition payload by name)."""
    x, target = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
    parts = [("pixels", x)] + ([(f"payload '{k}'", v) for k, v in target.items()]
                               if isinstance(target, dict) else [])
    for what, v in parts:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise NonFiniteItem(f"dataset item {index} has {bad} non-finite {what} (NaN / Inf); fix that item "
                                "or the dataset plugin that makes it")
    return item


def check_batch(images: torch.Tensor, first_index: int) -> None:
    """Raise :class:`NonFiniteItem` for the first row of ``images`` (items ``first_index``,
    ``first_index + 1``, ...) holding a NaN / Inf."""
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad_rows = (~torch.isfinite(images.flatten(1))).any(1).nonzero().flatten().tolist()
        check_finite((images[bad_rows[0]],), first_index + bad_rows[0])
