"""The textimages dataset: captions manifest + per-caption feature files or one table."""

import json

import pytest
import torch
from PIL import Image

from sar_adapters.infinity.data import TextImageFolder, textimages


def make_folder(root, n=4, ct5=256, table=False, sizes=((80, 64),)):
    (root / "img").mkdir(parents=True)
    (root / "feats").mkdir()
    rows, feats = [], {}
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(root / "img" / f"{i}.png")
        f = torch.randn(3 + i, ct5, generator=g) * 0.3
        row = {"image": f"img/{i}.png", "caption": f"caption {i}"}
        if table:
            feats[row["image"]] = f
        else:
            torch.save(f, root / "feats" / f"{i}.pt")
            row["features"] = f"feats/{i}.pt"
        rows.append(row)
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if table:
        torch.save(feats, root / "features.pt")
    return rows


@pytest.mark.parametrize("table", [False, True])
def test_items_are_images_and_text_features(tmp_path, table):
    make_folder(tmp_path, table=table)
    ds = textimages(str(tmp_path), image_size=(32, 64))
    assert len(ds) == 4
    x, target = ds[2]
    assert x.shape == (3, 32, 64) and -1 <= x.min() and x.max() <= 1
    assert set(target) == {"text_features"} and target["text_features"].shape == (5, 256)


def test_missing_manifest_and_features_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions manifest"):
        TextImageFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match="no condition payloads.*sar encode-text"):
        TextImageFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text('{"image": "a.png", "features": "a.pt"}\n{"image": "b.png"}\n')
    with pytest.raises(ValueError, match="1 of 2 manifest entries have no payload 'text_features' .e.g. b.png"):
        TextImageFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text('not json\n')
    with pytest.raises(ValueError, match="captions.jsonl:1: not a JSON object"):
        TextImageFolder(tmp_path)
