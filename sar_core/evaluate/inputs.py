"""What ``sar eval`` reads and makes before measuring: the reference set (checked before any
sampling; a folder's ``<split>`` sub-folder honoured; images of any size resized /
centre-cropped as ADM's reference batches) and the samples, streamed batch by batch into
one uint8 tensor (never all float32 in memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from sar_core.evaluate.generation import to_uint8


def resolve_reference(reference: str | Path, split: str) -> tuple[str, Optional[str]]:
    """(what to read, the split actually used): a registered dataset name (or NAME:FOLDER)
    and its split, or a folder: ``folder/<split>``, ``folder`` itself when it is named
    ``<split>`` or the split is ``.`` (split None); a missing split is refused
    (:func:`sar_core.data.datasets.split_folder`)."""
    from sar_core.plugins import get_registry

    from sar_core.data.datasets import dataset_at

    reg = get_registry()
    if str(reference) in reg.names("dataset") or dataset_at(str(reference), reg.names("dataset")):
        return str(reference), split
    base = Path(reference)
    if base.is_dir():
        from sar_core.data.datasets import THIS_FOLDER, split_folder

        where = split_folder(base, split)  # a missing split is refused, never read from base
        return str(where), (None if split in (None, "", THIS_FOLDER) else split)
    known = ", ".join(reg.names("dataset")) or "none"
    raise ValueError(f"reference '{reference}' is neither a registered dataset ({known}), NAME:FOLDER, nor a folder")


def reference_set(reference: str | Path, split: str, image_size: int | tuple[int, int]) -> Dataset:
    """A registered dataset name (its ``split`` at ``image_size``, S or (H, W)) or a folder
    of images (``folder/<split>`` if present; resized / centre-cropped to ``image_size`` as
    ADM's reference batches) -> uint8 image set. The first image is read at once, so a bad
    reference fails before any sampling."""
    from sar_core.data.datasets import dataset_at, image_hw
    from sar_core.data.datasets import open_dataset
    from sar_core.evaluate.images import DatasetImages, FolderImages
    from sar_core.plugins import get_registry

    hw = image_hw(image_size)
    where, used = resolve_reference(reference, split)
    names = get_registry().names("dataset")
    if where in names or dataset_at(where, names):
        data = DatasetImages(open_dataset(where, split=used, image_size=hw, deterministic=True))
    else:
        data = FolderImages(where, hw)
    if len(data) == 0:
        raise ValueError(f"reference '{reference}' (split {used}) holds no images")
    first = data[0]
    if tuple(first.shape) != (3, *hw):
        raise ValueError(f"reference '{reference}' gives {tuple(first.shape)} images, expected "
                         f"(3, {hw[0]}, {hw[1]})")
    return data


def sample_uint8(adapter, num: int, *, schedule, batch_size: int, samples_folder: str | Path | None = None,
                 names: Optional[torch.Tensor] = None, progress: Optional[Callable[[int], None]] = None,
                 **sampling) -> torch.Tensor:
    """``num`` samples (``sampling``: labels= or conditions=, see
    :func:`sar_core.evaluate.generation.iter_images`) streamed into one uint8 (N, 3, H, W) tensor (4x
    less memory than float32), each batch written to ``samples_folder`` as it comes
    (``names``: the labels put into the file names)."""
    from sar_core.evaluate.generation import iter_images, save_folder

    h, w = adapter.image_size(schedule)
    out = torch.empty(num, 3, h, w, dtype=torch.uint8)
    row = 0
    for images in iter_images(adapter, schedule=schedule, batch_size=batch_size, **sampling):
        out[row:row + len(images)] = to_uint8(images)
        if samples_folder:
            part = None if names is None else names[row:row + len(images)].tolist()
            save_folder(images, samples_folder, part, start=row)
        row += len(images)
        if progress is not None:
            progress(len(images))
    return out


def looks_rgb(images: torch.Tensor, tolerance: int = 8) -> bool:
    """Whether uint8 (N, 3, H, W) images have colour (channels differ by more than ``tolerance``)."""
    x = images[: min(len(images), 256)].int()
    return bool(((x[:, 0] - x[:, 1]).abs().max() > tolerance) or ((x[:, 1] - x[:, 2]).abs().max() > tolerance))



