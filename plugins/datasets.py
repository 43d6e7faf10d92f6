"""Image datasets for training and evaluation (registered by the ``core`` plugin).

``imagefolder``: an ImageNet-layout folder, one sub-folder per class::

    root/n01440764/xxx.JPEG
    root/n01443537/yyy.JPEG            (or root/<split>/<class>/... when root/<split> exists)

A split is ``root/<split>``, or ``root`` itself when it is named ``<split>``, when the
split is ``.``, or (split ``train`` only) when ``root`` is a plain class folder; any other
missing split is refused (:func:`sar_core.data.datasets.split_folder`), never read from
``root`` instead.

Classes are the sorted sub-folder names, labels their indices; a class map file
(``class_map``, format in :mod:`sar_core.data.classes`) picks a subset and / or sets the labels.
Transforms follow the VAR family's training pipeline: resize the shorter side to
``round(resize_ratio * S)`` (Lanczos), random crop to S x S (or H x W for an
``image_size`` pair, the shorter side then going to ``round(resize_ratio * max(H, W))``)
and random horizontal flip when augmenting (the default for the ``train`` split), centre
crop otherwise, then values in [-1, 1]. Randomness comes
from torch's global RNG, which the trainer seeds per item. Every PIL mode is read as 8-bit
RGB correctly (:mod:`sar_core.data.image_io`: 16-bit scaled, not clipped; alpha on white);
each kind of conversion, and upscaling of small images, is said once per dataset.

Mixed aspect ratios: when the trainer passes ``image_sizes`` (models that train several
sizes, e.g. Infinity's templates) and some image is nearer in h/w to another size than to
``image_size``, every image goes to its nearest size (read from its header): resized to
cover ``resize_ratio`` times it, keeping its aspect, then cropped to it, one size per batch
(:class:`sar_core.data.datasets.AspectGrouped`). Otherwise every image goes to ``image_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from sar_core.data.datasets import AspectGrouped, image_hw, size_buckets, size_option, split_folder
from sar_core.data.image_io import ConversionNotes, open_rgb8

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def scan_folder(root: Path, class_map: Optional[dict[str, int]] = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """(items (path, label), class folder names); with ``class_map`` only its folders,
    labelled as it says."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>, ImageNet layout)")
    labels = {name: i for i, name in enumerate(classes)}
    if class_map is not None:
        missing = sorted(set(class_map) - set(classes))
        if missing:
            raise ValueError(f"class map names folders that {root} does not have: {', '.join(missing[:5])}"
                             + (" ..." if len(missing) > 5 else ""))
        classes, labels = [c for c in classes if c in class_map], dict(class_map)
    items = []
    for name in classes:
        label = labels[name]
        for p in sorted((root / name).rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                items.append((p, label))
    if not items:
        raise ValueError(f"{root}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} in its class folders")
    return items, classes


def build_transform(image_size: int | tuple[int, int], augment: bool, resize_ratio: Optional[float] = 1.125,
                    hflip: bool = True):
    """``image_size`` S or (H, W): the shorter side goes to round(ratio * max(H, W)), then a
    (H, W) crop (no resize for ``resize_ratio=None``)."""
    from torchvision import transforms as T

    h, w = image_hw(image_size)
    crop = T.RandomCrop((h, w)) if augment else T.CenterCrop((h, w))
    steps = [crop]
    if resize_ratio is not None:
        steps.insert(0, T.Resize(round(resize_ratio * max(h, w)), interpolation=T.InterpolationMode.LANCZOS))
    if augment and hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)]
    return T.Compose(steps)


class ImageFolderDataset(Dataset):
    """(image (3, H, W) float in [-1, 1], label int64) from class sub-folders."""

    def __init__(self, root: str | Path, split: str = "train", image_size: int | tuple[int, int] = 256,
                 augment: Optional[bool] = None, hflip: bool = True, resize_ratio: float = 1.125,
                 class_map: str | Path | None = None, buckets: Optional[list] = None):
        from sar_core.data.classes import read_class_map

        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"image folder not found: {base}")
        self.root = split_folder(base, split)  # a missing split is refused, never replaced
        self.class_map = read_class_map(class_map) if class_map else None
        self.items, self.classes = scan_folder(self.root, self.class_map)
        self.image_size = size_option(image_size)
        self.augment = (split == "train") if augment is None else bool(augment)
        self.transform = build_transform(self.image_size, self.augment, resize_ratio, hflip)
        self.buckets, self.resize_ratio = buckets, resize_ratio  # per-item (H, W), or None
        self.bucket_tf = {hw: build_transform(hw, self.augment, None, hflip) for hw in set(buckets or ())}
        self.notes = ConversionNotes(f"image folder {self.root}")

    @property
    def num_classes(self) -> int:
        """Class folders, or with a class map the largest mapped label + 1."""
        return max(self.class_map.values()) + 1 if self.class_map else len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.items[i]
        img, notes = open_rgb8(path)
        side = max(image_hw(self.image_size))
        if min(img.size) < side:
            notes.append(f"images smaller than {side} px a side upscaled")
        self.notes.add(notes)
        if self.buckets is None:
            return self.transform(img), torch.tensor(label, dtype=torch.int64)
        return self._bucketed(img, self.buckets[i]), torch.tensor(label, dtype=torch.int64)

    def _bucketed(self, img, hw: tuple[int, int]) -> torch.Tensor:
        """Resize to cover ``resize_ratio`` x (H, W) keeping the aspect, then crop."""
        from PIL import Image

        h, w = hw
        s = self.resize_ratio * max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.LANCZOS)
        return self.bucket_tf[hw](img)

    def __repr__(self) -> str:
        return (f"ImageFolderDataset(root={str(self.root)!r}, n={len(self)}, classes={len(self.classes)}, "
                f"image_size={self.image_size}, augment={self.augment})")


def imagefolder(root: str, split: str = "train", image_size: int | tuple[int, int] = 256,
                augment: Optional[bool] = None, hflip: bool = True, resize_ratio: float = 1.125,
                class_map: Optional[str] = None, image_sizes: Optional[list] = None, **_) -> ImageFolderDataset:
    """Factory registered as dataset ``imagefolder`` (``class_map``: a file, see
    :mod:`sar_core.data.classes`; ``image_sizes``: see the module text)."""
    kw = dict(split=split, image_size=image_size, augment=augment, hflip=hflip, resize_ratio=resize_ratio,
              class_map=class_map)
    ds = ImageFolderDataset(root, **kw)
    if not image_sizes:
        return ds
    buckets = size_buckets([p for p, _ in ds.items], image_sizes)
    if set(buckets) <= {image_hw(ds.image_size)}:
        return ds
    return AspectImageFolder(root, **kw, buckets=buckets)


class AspectImageFolder(ImageFolderDataset, AspectGrouped):
    """An image folder of mixed aspect ratios: each image in its size bucket."""

    def group_of(self, index: int) -> tuple[int, int]:
        return self.buckets[index]


#: registered by the ``core`` plugin (name -> factory)
BUILTIN_DATASETS = {"imagefolder": imagefolder}
