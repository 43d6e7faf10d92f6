"""Image sets as torch-fidelity consumes them: items uint8 (3, H, W) RGB, from a tensor, a
sar dataset of (image in [-1, 1], target) items, or a folder of image files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sar_core.evaluate.generation import to_uint8


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class UInt8Images(Dataset):
    """A tensor of images -> items uint8 (3, H, W), what torch-fidelity consumes.

    Float tensors are taken in [0, 1] (``generate`` output); uint8 tensors pass through."""

    def __init__(self, images: torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got {tuple(images.shape)}")
        self.images = images if images.dtype == torch.uint8 else to_uint8(images.float())

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class DatasetImages(Dataset):
    """A sar dataset of (image in [-1, 1], target) -> items uint8 (3, H, W)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return to_uint8((image.float() + 1) / 2)


class FolderImages(Dataset):
    """Every image file under a folder (recursively), as uint8 (3, H, W) RGB.

    With ``image_size`` (S or (H, W)), images are resized / centre-cropped as ADM's
    reference batches were (:func:`sar_core.data.image_io.adm_center_crop`), so mixed sizes
    work; without it every image must already have the same size."""

    def __init__(self, folder: str | Path, image_size: int | tuple[int, int] | None = None):
        from sar_core.data.image_io import ConversionNotes

        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        from sar_core.data.datasets import image_hw

        self.root, self.image_size = root, (None if image_size is None else image_hw(image_size))
        self.notes = ConversionNotes(f"reference folder {root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from sar_core.data.image_io import adm_center_crop, open_rgb8

        img, notes = open_rgb8(self.paths[i])
        self.notes.add(notes)
        if self.image_size is not None and img.size[::-1] != self.image_size:
            img = adm_center_crop(img, self.image_size)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def as_image_set(x: Any) -> Dataset:
    """An image tensor, an (image, target) dataset, or a folder path -> uint8 image dataset."""
    if isinstance(x, (UInt8Images, DatasetImages, FolderImages)):
        return x
    if isinstance(x, torch.Tensor):
        return UInt8Images(x)
    if isinstance(x, (str, Path)):
        return FolderImages(x)
    if isinstance(x, Dataset):
        return DatasetImages(x)
    raise TypeError(f"cannot use {type(x).__name__} as an image set (tensor, dataset or folder)")



