"""The ``digits`` dataset: scikit-learn's bundled handwritten digits, no download.

1,797 real 8x8 grey-level scans (intensities 0..16, ten classes) ship inside
scikit-learn (``sklearn.datasets.load_digits``), so this dataset works offline and is
small enough to post-train a tiny model on a laptop CPU in minutes.

* Split: within every class the images are shuffled with a fixed seed and the first
  ``round(10%)`` go to ``val``, the rest to ``train`` (disjoint, identical on every machine).
* Items: ``(image, label)``, image float (3, S, S) in [-1, 1] (white digit on black,
  the grey level copied to the three channels), label int64. S is ``image_size``: the 8x8
  grid is resized bicubically (area-averaged when S < 8) and clamped to the valid range.
* ``hflip`` (random horizontal flip, p = 0.5) is OFF by default: digits are not
  flip-invariant (a mirrored 2 or 7 is not a digit), so flipping only makes sense to test
  code paths, not to train a good model.

``digits-aug``: the same splits, each image repeated ``copies`` times (train 64, val 8)
under a label-preserving random affine warp (rotation within +-12 degrees, scale
0.9-1.1, shear within +-8 degrees, shift within +-6% of the side, bilinear). Item ``i`` is
image ``i % n`` warped with an RNG seeded by ``(split, i)``: the dataset is fixed (every
machine and every epoch see the same 103,552 training images), so runs resume bit-exactly,
yet a small model cannot memorise it the way it memorises the 1,618 raw training digits.

``digits-text``: ``digits-aug`` as a text-to-image dataset, items shaped like the
``textimages`` dataset's: ``(image, {"text_features": (tokens, text_channels), "label": c})``.
The caption of digit c is ``"digit c"`` (:meth:`TextDigits.caption`); its features come from
a frozen stand-in text encoder of the ten captions: ``tokens`` standard-normal rows of
width ``text_channels``, drawn for all ten at once from a generator seeded ``seed``. The
defaults (2 x 32, seed 20251206) are the Infinity miniature's stand-in prompts, so its real
text path (features in the batch, no class ids) reads the captions it was trained on.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sar_core.data.datasets import image_hw, size_option
from sar_core.hookspecs import hookimpl

NUM_CLASSES = 10
VAL_FRACTION = 0.1
SPLIT_SEED = 20240611  # fixed: changing it changes which images are validation images


@lru_cache(maxsize=1)
def _load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) float32 in [0, 1] and (1797,) int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an optional dependency (extra 'demo')
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install 'sar[demo]'") from exc
    data = load_digits()
    images = (data.images.astype(np.float32) / 16.0).clip(0.0, 1.0)
    return images, data.target.astype(np.int64)


def split_indices(labels: np.ndarray, split: str, val_fraction: float = VAL_FRACTION,
                  seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of ``split`` ('train' | 'val' | 'all'), stratified by class."""
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train', 'val' or 'all', got {split!r}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        val.append(members[: int(round(val_fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val))
    if split == "val":
        return val_idx
    return np.setdiff1d(np.arange(len(labels)), val_idx)


def render(grid_8x8: torch.Tensor, image_size: int | tuple[int, int]) -> torch.Tensor:
    """(..., 8, 8) in [0, 1] -> (..., 3, H, W) in [-1, 1] (``image_size``: S or (H, W)).

    Shrinking on both axes averages areas; any enlarging is bicubic."""
    h, w = image_hw(image_size)
    x = grid_8x8.reshape(-1, 1, *grid_8x8.shape[-2:]).float()
    if (h, w) != tuple(x.shape[-2:]):
        shrink = h <= x.shape[-2] and w <= x.shape[-1]
        x = (F.interpolate(x, size=(h, w), mode="area") if shrink else
             F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False))
    x = x.clamp(0.0, 1.0).mul(2).sub(1).expand(-1, 3, -1, -1)
    return x.reshape(*grid_8x8.shape[:-2], 3, h, w).contiguous()


class DigitsDataset(Dataset):
    """(image (3, H, W) in [-1, 1], label int64) of one split of scikit-learn's digits."""

    num_classes = NUM_CLASSES

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = 16, hflip: bool = False):
        images, labels = _load_arrays()
        self.indices = split_indices(labels, split)
        self.grids = torch.from_numpy(images[self.indices])
        self.labels = torch.from_numpy(labels[self.indices])
        self.split, self.image_size, self.hflip = split, size_option(image_size), bool(hflip)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = render(self.grids[i], self.image_size)
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[i]

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, n={len(self)}, image_size={self.image_size})"


AUG_COPIES = {"train": 64, "val": 8, "all": 8}
AUG_SEED = {"train": 1, "val": 2, "all": 3}


def affine_warp(image_3HW: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label-preserving random affine warp of an image in [-1, 1] (background -1)."""
    u = torch.rand(5, generator=generator, dtype=torch.float64).mul(2).sub(1)  # in [-1, 1)
    angle, shear = float(u[0]) * np.deg2rad(12.0), float(u[1]) * np.deg2rad(8.0)
    scale = 1.0 + 0.1 * float(u[2])
    tx, ty = 0.12 * float(u[3]), 0.12 * float(u[4])  # +-6% of the side in [-1, 1] coordinates
    c, s_ = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s_], [s_, c]]) @ np.array([[1.0, np.tan(shear)], [0.0, 1.0]]) / scale
    theta = torch.tensor([[rot[0, 0], rot[0, 1], tx], [rot[1, 0], rot[1, 1], ty]], dtype=torch.float32)
    x = image_3HW.unsqueeze(0).add(1)  # background 0 so the padding zeros blend in
    grid = F.affine_grid(theta.unsqueeze(0), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(0).sub(1).clamp(-1.0, 1.0)


class AugmentedDigits(DigitsDataset):
    """``copies`` fixed affine-warped versions of every image of a digits split."""

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = 16,
                 copies: int | None = None):
        super().__init__(split=split, image_size=image_size)
        self.copies = int(copies if copies is not None else AUG_COPIES[split])
        if self.copies < 1:
            raise ValueError(f"digits-aug copies must be >= 1, got {self.copies}")
        self.base_labels, self.labels = self.labels, self.labels.repeat(self.copies)
        self._seed = AUG_SEED[split] * 1_000_003

    def __len__(self) -> int:
        return len(self.indices) * self.copies

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        n = len(self.indices)
        image = render(self.grids[i % n], self.image_size)
        generator = torch.Generator().manual_seed(self._seed + int(i))
        return affine_warp(image, generator), self.base_labels[i % n]

    def __repr__(self) -> str:
        return f"AugmentedDigits(split={self.split!r}, n={len(self)}, copies={self.copies}, image_size={self.image_size})"


TEXT_SEED = 20251206  # the Infinity adapter's stand-in seed: its miniature knows these prompts


def caption_features(tokens: int = 2, text_channels: int = 32, seed: int = TEXT_SEED) -> torch.Tensor:
    """(10, tokens, text_channels) float32: the frozen features of the captions "digit 0".."digit 9"."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(NUM_CLASSES, int(tokens), int(text_channels), generator=g)


class TextDigits(AugmentedDigits):
    """``digits-aug`` with a caption and its text features per image (see the module text)."""

    def __init__(self, split: str = "train", image_size: int | tuple[int, int] = 16, copies: int | None = None,
                 tokens: int = 2, text_channels: int = 32, seed: int = TEXT_SEED):
        super().__init__(split=split, image_size=image_size, copies=copies)
        self.features = caption_features(tokens, text_channels, seed)

    def caption(self, i: int) -> str:
        return f"digit {int(self.base_labels[i % len(self.indices)])}"

    def __getitem__(self, i: int):
        image, label = super().__getitem__(i)
        return image, {"text_features": self.features[int(label)], "label": int(label)}

    def __repr__(self) -> str:
        return f"TextDigits(split={self.split!r}, n={len(self)}, features={tuple(self.features.shape[1:])})"


def digits(split: str = "train", image_size: int | tuple[int, int] = 16, hflip: bool = False,
           **_) -> DigitsDataset:
    """Factory registered as dataset ``digits`` (extra options are ignored)."""
    return DigitsDataset(split=split, image_size=image_size, hflip=hflip)


def digits_aug(split: str = "train", image_size: int | tuple[int, int] = 16, copies: int | None = None,
               **_) -> AugmentedDigits:
    """Factory registered as dataset ``digits-aug`` (extra options are ignored)."""
    return AugmentedDigits(split=split, image_size=image_size, copies=copies)


def digits_text(split: str = "train", image_size: int | tuple[int, int] = 16, copies: int | None = None,
                tokens: int = 2, text_channels: int = 32, seed: int = TEXT_SEED, **_) -> TextDigits:
    """Factory registered as dataset ``digits-text`` (extra options are ignored)."""
    return TextDigits(split=split, image_size=image_size, copies=copies, tokens=tokens,
                      text_channels=text_channels, seed=seed)


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"dataset": ["digits", "digits-aug", "digits-text"]}


@hookimpl
def register_datasets(register):
    register("digits", digits)
    register("digits-aug", digits_aug)
    register("digits-text", digits_text)
