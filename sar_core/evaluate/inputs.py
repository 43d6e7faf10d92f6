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


COLOUR_TOLERANCE = 8        # channel difference (of 255) that counts as colour, above JPEG / resize noise
COLOUR_MIN_FRACTION = 0.01  # an image set is in colour when more than 1% of its pixels are


def colour_fraction(images, tolerance: int = COLOUR_TOLERANCE, max_images: int = 256) -> float:
    """Fraction of pixels whose channels differ by more than ``tolerance`` over up to
    ``max_images`` images spread evenly over the set (a uint8 (N, 3, H, W) tensor or an
    image dataset of uint8 (3, H, W) items), so one odd pixel does not decide."""
    n = len(images)
    if n == 0:
        return 0.0
    idx = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
    x = images[idx] if isinstance(images, torch.Tensor) else torch.stack([images[int(i)] for i in idx])
    x = x.int()
    spread = torch.maximum((x[:, 0] - x[:, 1]).abs(), (x[:, 1] - x[:, 2]).abs())
    return float((spread > tolerance).float().mean())


def looks_rgb(images, tolerance: int = COLOUR_TOLERANCE, min_fraction: float = COLOUR_MIN_FRACTION) -> bool:
    """Whether an image set is in colour: more than ``min_fraction`` of its pixels have
    channels that differ by more than ``tolerance``."""
    return colour_fraction(images, tolerance) > min_fraction


def colour_note(extractor_name: str, samples, reference=None) -> Optional[str]:
    """For a feature extractor trained on grayscale images: a note naming which of the
    samples and the reference is in colour (None when neither is)."""
    parts = []
    for what, images in (("the samples are", samples), ("the reference images are", reference)):
        if images is not None:
            f = colour_fraction(images)
            if f > COLOUR_MIN_FRACTION:
                parts.append(f"{what} in colour ({100 * f:.0f}% of the pixels checked)")
    if not parts:
        return None
    return (f"feature extractor '{extractor_name}' was trained on grayscale images, but {' and '.join(parts)}: "
            "its FID is not meaningful there (use --feature-extractor inception)")
