"""Text-conditioned training data without a network: images + pre-computed text features.

Dataset ``textimages`` (registered by the ``infinity`` plugin)::

    root/
      captions.jsonl          one JSON object per image:
                              {"image": "img/0001.png", "caption": "a red fox", "features": "feats/0001.pt"}
      img/0001.png ...
      feats/0001.pt ...       one (n_i, Ct5) float tensor per caption (e.g. flan-t5-xl last_hidden_state
                              rows of the valid tokens, EOS included)

Instead of one file per caption, ``features`` (option, default ``features.pt`` when it
exists) may name one file holding a dict {image path as in the manifest: (n_i, Ct5)}.
``caption`` is kept for people and encoders; it is not read here. Items are
``(image (3, H, W) in [-1, 1], {"text_features": (n_i, Ct5)})``; images are resized
(shorter side, bicubic) and centre-cropped to the model's (H, W) like upstream's loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from sar_core.data.datasets import AspectGrouped, size_buckets

PAYLOAD = "text_features"


def read_manifest(root: Path, manifest: str) -> list[dict]:
    path = root / manifest
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {manifest}: a textimages folder needs a captions manifest "
                                "(one JSON object per line with 'image' and 'features'; see docs/infinity.md)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not a JSON object ({exc.msg})") from None
        if not isinstance(row, dict) or "image" not in row:
            raise ValueError(f"{path}:{i}: each line needs an 'image' path")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} lists no images")
    return rows


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class TextImageFolder(Dataset):
    def __init__(self, root: str | Path, image_size=256, manifest: str = "captions.jsonl",
                 features: Optional[str] = None, buckets: Optional[list] = None):
        from sar_core.checkpoint_io import load_file

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"textimages folder not found: {self.root}")
        self.rows = read_manifest(self.root, manifest)
        self.size = _size(image_size)
        self.buckets = buckets  # per-item (H, W), or None: every item at ``size``
        table = features or ("features.pt" if (self.root / "features.pt").is_file() else None)
        self.table = load_file(self.root / table, what="text features") if table else None
        missing = [r["image"] for r in self.rows if self._has(r) is False]
        if missing:
            raise ValueError(f"{len(missing)} manifest entries have no text features (e.g. {missing[0]}); "
                             "give each a 'features' file or list it in the features table")

    def _has(self, row: dict) -> bool:
        if self.table is not None:
            return row["image"] in self.table
        return "features" in row

    def __len__(self) -> int:
        return len(self.rows)

    def features(self, i: int) -> torch.Tensor:
        from sar_core.checkpoint_io import load_file

        row = self.rows[i]
        t = self.table[row["image"]] if self.table is not None else load_file(self.root / row["features"],
                                                                              what="text features")
        t = torch.as_tensor(t).float()
        if t.dim() != 2 or t.shape[0] < 1:
            raise ValueError(f"text features of {row['image']} must be (n_i, Ct5) with n_i >= 1, got {tuple(t.shape)}")
        return t

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import transforms as T

        h, w = self.buckets[i] if self.buckets is not None else self.size
        tf = T.Compose([T.CenterCrop((h, w)), T.ToTensor()])
        with Image.open(self.root / self.rows[i]["image"]) as img:
            x = tf(_cover(img.convert("RGB"), h, w))
        return x * 2 - 1, {PAYLOAD: self.features(i)}


def _cover(img, h: int, w: int):
    """Resize so the image covers (h, w) keeping its aspect ratio (then centre-crop)."""
    from PIL import Image

    s = max(h / img.height, w / img.width)
    return img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.BICUBIC)


class AspectTextImageFolder(TextImageFolder, AspectGrouped):
    """A textimages folder of mixed aspect ratios: each image in its size bucket."""

    def group_of(self, index: int) -> tuple[int, int]:
        return self.buckets[index]


def textimages(root: str, split: str = "train", image_size=256, manifest: str = "captions.jsonl",
               features: Optional[str] = None, image_sizes: Optional[list] = None, **_) -> TextImageFolder:
    """Factory registered as dataset ``textimages``. With ``image_sizes`` (given by the
    trainer for models that train several sizes) images whose nearest size is not
    ``image_size`` are bucketed, one bucket per batch; otherwise all go to ``image_size``."""
    ds = TextImageFolder(root, image_size, manifest, features)
    if not image_sizes:
        return ds
    buckets = size_buckets([ds.root / r["image"] for r in ds.rows], image_sizes)
    if set(buckets) <= {ds.size}:
        return ds
    return AspectTextImageFolder(root, image_size, manifest, features, buckets)
