"""Text-conditioned training data without a network: images + pre-computed condition payloads.

Dataset ``textimages`` (registered by the ``core`` plugin; ``--data textimages:DIR``)::

    DIR/
      captions.jsonl                 one JSON object per image: {"image": "img/0001.png", "caption": "a red fox"}
      img/0001.png ...
      payloads/<name>/img/0001.png.pt    payload column <name>: one (n_i, D) float tensor per image,
                                         at the image's manifest path + ".pt"
      payloads/<name>.pt                 ... or the whole column as one table {image path: (n_i, D)}
      null_payloads.pt                   optional: {name: (n, D)}, the encoder's features of the
                                         empty prompt (families with encoder-derived null conditions)

Every folder or ``.pt`` file in ``payloads/`` is a column, e.g. ``text_features`` (T5 rows
for Infinity) or ``clip_pooled`` (1, D) + ``clip_tokens`` (n_i, D) for CLIP-conditioned
families; ``sar encode-text`` writes this layout from the captions. The layout before
named columns still reads as the column ``text_features``: a manifest key ``"features":
"feats/0001.pt"`` per row, or one table ``features.pt`` (option ``features``).

Options: ``payloads`` (names, a list or "a,b": read only these columns; default all),
``features``, ``manifest``. Items are ``(image (3, H, W) in [-1, 1], {name: (n_i, D), ...})``;
images are resized (shorter side, bicubic) and centre-cropped to the model's (H, W) like
upstream Infinity's loader. The dataset's ``null_payloads`` (from ``null_payloads.pt``)
reach the adapter through the trainer. ``caption`` is for people and encoders; it is not
read here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from sar_core.data.datasets import AspectGrouped, size_buckets
from sar_core.data.payloads import NULL_FILE

LEGACY = "text_features"  # the column of the layout before named payloads
PAYLOAD_DIR = "payloads"


def payload_path(image: str) -> str:
    """Where an image's payload file sits inside a column folder: its manifest path + '.pt'."""
    return str(Path(image.lstrip("/")).as_posix()) + ".pt"


def read_manifest(root: Path, manifest: str) -> list[dict]:
    path = root / manifest
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no {manifest}: a textimages folder needs a captions manifest "
                                "(one JSON object per line with 'image' and 'caption'; see docs/plugins.md)")
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


def _names(option) -> Optional[list[str]]:
    if option is None:
        return None
    names = [n.strip() for n in (option.split(",") if isinstance(option, str) else option) if str(n).strip()]
    return names or None


def _files_under(folder: Path) -> set[str]:
    out = set()
    for base, _, files in os.walk(folder):
        rel = Path(base).relative_to(folder)
        out.update((rel / f).as_posix() for f in files if f.endswith(".pt"))
    return out


class Column:
    """One payload column: a folder of per-image files, a table, or the legacy 'features' key."""

    def __init__(self, root: Path, name: str, kind: str, where: Path):
        from sar_core.checkpoint_io import load_file

        self.root, self.name, self.kind, self.where = root, name, kind, where
        self.table = load_file(where, what=f"payload table '{name}'") if kind == "table" else None
        if self.table is not None and not isinstance(self.table, dict):
            raise ValueError(f"{where} must hold a dict {{image path: (n_i, D) tensor}}")
        self.files = _files_under(where) if kind == "folder" else None

    def has(self, row: dict) -> bool:
        if self.kind == "table":
            return row["image"] in self.table
        if self.kind == "folder":
            return payload_path(row["image"]) in self.files
        return "features" in row

    def load(self, row: dict) -> torch.Tensor:
        from sar_core.checkpoint_io import load_file

        if self.kind == "table":
            t = self.table[row["image"]]
        else:
            path = self.where / payload_path(row["image"]) if self.kind == "folder" else self.root / row["features"]
            t = load_file(path, what=f"payload '{self.name}'")
        t = torch.as_tensor(t).float()
        if t.dim() != 2 or t.shape[0] < 1:
            raise ValueError(f"payload '{self.name}' of {row['image']} must be (n_i, D) with n_i >= 1, "
                             f"got {tuple(t.shape)}")
        return t


def find_columns(root: Path, rows: list[dict], features: Optional[str]) -> dict[str, Column]:
    cols: dict[str, Column] = {}
    pdir = root / PAYLOAD_DIR
    for entry in sorted(pdir.iterdir()) if pdir.is_dir() else ():
        name = entry.name if entry.is_dir() else entry.stem
        if not entry.is_dir() and entry.suffix != ".pt":
            continue
        if name in cols:
            raise ValueError(f"{pdir}: the payload '{name}' is both a folder and a table; keep one")
        cols[name] = Column(root, name, "folder" if entry.is_dir() else "table", entry)
    table = features or ("features.pt" if (root / "features.pt").is_file() else None)
    legacy = Column(root, LEGACY, "table", root / table) if table else (
        Column(root, LEGACY, "key", root) if any("features" in r for r in rows) else None)
    if legacy is not None:
        if LEGACY in cols:
            raise ValueError(f"{root}: the payload '{LEGACY}' is given twice ({PAYLOAD_DIR}/{LEGACY} and "
                             "the manifest's 'features' / features.pt); keep one")
        cols[LEGACY] = legacy
    return cols


class TextImageFolder(Dataset):
    def __init__(self, root: str | Path, image_size=256, manifest: str = "captions.jsonl",
                 features: Optional[str] = None, buckets: Optional[list] = None, payloads=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"textimages folder not found: {self.root}")
        self.rows = read_manifest(self.root, manifest)
        self.size = _size(image_size)
        self.buckets = buckets  # per-item (H, W), or None: every item at ``size``
        cols = find_columns(self.root, self.rows, features)
        if not cols:
            raise ValueError(f"{self.root} holds no condition payloads: encode the captions first "
                             f"(sar encode-text {self.root / manifest} --encoder t5|clip --model DIR) or give "
                             f"each manifest row 'features'")
        wanted = _names(payloads)
        if wanted is not None:
            unknown = [n for n in wanted if n not in cols]
            if unknown:
                raise ValueError(f"{self.root} has no payload column '{unknown[0]}' (it has: {', '.join(cols)})")
            cols = {n: cols[n] for n in wanted}
        self.columns = cols
        for col in cols.values():
            missing = [r["image"] for r in self.rows if not col.has(r)]
            if missing:
                raise ValueError(f"{len(missing)} of {len(self.rows)} manifest entries have no payload "
                                 f"'{col.name}' (e.g. {missing[0]}); finish `sar encode-text` or drop them")
        self.null_payloads = self._read_nulls()

    def _read_nulls(self) -> dict:
        from sar_core.checkpoint_io import load_file

        path = self.root / NULL_FILE
        if not path.is_file():
            return {}
        got = load_file(path, what="null payloads")
        if not isinstance(got, dict):
            raise ValueError(f"{path} must hold a dict {{payload name: (n, D) tensor}}")
        return {k: v for k, v in got.items() if k in self.columns}

    @property
    def payload_names(self) -> list[str]:
        return list(self.columns)

    def __len__(self) -> int:
        return len(self.rows)

    def caption(self, i: int) -> str:
        """The manifest's caption of item ``i`` (its image path when it has none): grid labels."""
        row = self.rows[i]
        return str(row.get("caption") or row["image"])

    def payloads(self, i: int) -> dict[str, torch.Tensor]:
        return {name: col.load(self.rows[i]) for name, col in self.columns.items()}

    def features(self, i: int) -> torch.Tensor:
        """The ``text_features`` payload of item ``i`` (the layout before named payloads)."""
        return self.columns[LEGACY].load(self.rows[i])

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision import transforms as T

        h, w = self.buckets[i] if self.buckets is not None else self.size
        tf = T.Compose([T.CenterCrop((h, w)), T.ToTensor()])
        with Image.open(self.root / self.rows[i]["image"]) as img:
            x = tf(_cover(img.convert("RGB"), h, w))
        return x * 2 - 1, self.payloads(i)


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
               features: Optional[str] = None, image_sizes: Optional[list] = None, payloads=None,
               **_) -> TextImageFolder:
    """Factory registered as dataset ``textimages``. With ``image_sizes`` (given by the
    trainer for models that train several sizes) images whose nearest size is not
    ``image_size`` are bucketed, one bucket per batch; otherwise all go to ``image_size``."""
    ds = TextImageFolder(root, image_size, manifest, features, payloads=payloads)
    if not image_sizes:
        return ds
    buckets = size_buckets([ds.root / r["image"] for r in ds.rows], image_sizes)
    if set(buckets) <= {ds.size}:
        return ds
    return AspectTextImageFolder(root, image_size, manifest, features, buckets, payloads=payloads)
