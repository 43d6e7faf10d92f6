"""Issue 11 item 2: the data's class count is checked against the model's before training;
a class map picks / maps classes; resize_classes grows the embedding (VAR, FlexVAR)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import toy_adapter as toy
from test_user_paths import tiny_var

FIX = Path(__file__).parent / "fixtures"


def _folder(root: Path, n_classes: int, per_class: int = 2, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_var().save(d / "tok.pth", d / "bb.pth")
    return d / "tok.pth", d / "bb.pth"


def _train(files, data, out, *extra):
    tok, bb = files
    return toy.invoke("train", "-f", "var", "--tokenizer", tok, "--backbone", bb, "--data", data,
                      "--image-size", "16", "--steps", "1", "--batch-size", "2", "--workers", "0",
                      "--rollout", "none", "--loggers", "jsonl", "--out", out, *extra)


def test_more_class_folders_than_model_classes_is_refused(files, tmp_path):
    for n in (11, 12):  # 11: was trained as the null class; 12: crashed with IndexError
        data = _folder(tmp_path / f"d{n}", n, per_class=1)
        r = _train(files, data, tmp_path / f"run{n}")
        assert r.exit_code == 2, r.output
        text = " ".join(r.output.split())
        assert f"has {n} classes but the model has 10" in text and "--class-map" in text
        assert "--resize-classes" in text and "Traceback" not in r.output
        assert not (tmp_path / f"run{n}" / "checkpoints").exists()


def test_class_map_subset_and_mapping(files, tmp_path):
    from sar_plugins.datasets import ImageFolderDataset

    data = _folder(tmp_path / "d", 12, per_class=1)
    cmap = tmp_path / "classes.txt"
    cmap.write_text("# keep three classes\nclass11 0\nclass03 9   # onto model class 9\nclass05\n")
    ds = ImageFolderDataset(data, image_size=16, class_map=cmap)
    labels = sorted(int(ds[i][1]) for i in range(len(ds)))
    assert len(ds) == 3 and labels == [0, 2, 9] and ds.num_classes == 10
    r = _train(files, data, tmp_path / "run", "--class-map", cmap)
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.txt"
    bad.write_text("nope 1\n")
    r = _train(files, data, tmp_path / "run2", "--class-map", bad)
    assert r.exit_code == 2 and "nope" in r.output


def test_resize_classes_option_trains_and_exports_more_classes(files, tmp_path):
    from sar_adapters.var.adapter import VARAdapter

    data = _folder(tmp_path / "d", 12, per_class=1)
    r = _train(files, data, tmp_path / "run", "--resize-classes")
    assert r.exit_code == 0, r.output
    assert "from 10 to 12 classes" in " ".join(r.output.split())
    out = VARAdapter.load(files[0], tmp_path / "run" / "backbone.pth")
    assert out.num_classes == 12 and out.backbone.class_emb.weight.shape[0] == 13


@pytest.mark.parametrize("family", ["var", "flexvar"])
def test_resize_classes_keeps_rows_and_the_null_class_last(family):
    if family == "var":
        adapter = tiny_var()
        std = math.sqrt(1 / adapter.backbone.C / 3)
    else:
        from sar_adapters.flexvar.adapter import FlexVARAdapter

        adapter = FlexVARAdapter.load(FIX / "flexvar" / "FlexVAE_tiny.pth", FIX / "flexvar" / "FlexVARd2-tiny.pth")
        std = 0.02
    k = adapter.num_classes
    old = adapter.backbone.class_emb.weight.detach().clone()
    n = k + 40
    torch.manual_seed(0)
    adapter.resize_classes(n)
    new = adapter.backbone.class_emb.weight.detach()
    assert adapter.num_classes == n and new.shape == (n + 1, old.shape[1])
    assert torch.equal(new[:k], old[:k]) and torch.equal(new[n], old[k])   # kept rows, null row last
    fresh = new[k:n]
    # upstream calls trunc_normal_(std=s) with its default bounds (+-2, absolute): a plain normal here
    assert fresh.abs().max() <= 2 and abs(fresh.std().item() - std) < 0.1 * std and abs(fresh.mean()) < 0.1 * std
    assert adapter.backbone.class_emb.weight.requires_grad
    labels = torch.tensor([0, n - 1])
    assert torch.equal(adapter.null_condition(labels), torch.full((2,), n))
    adapter.resize_classes(3)  # shrinking keeps the first rows and the null row
    assert torch.equal(adapter.backbone.class_emb.weight[:3], old[:3])
    assert torch.equal(adapter.backbone.class_emb.weight[3], old[k])


def test_family_without_resize_refuses_with_a_message():
    from sar_core.data.classes import check_classes

    reg = toy.make_registry()
    adapter = reg.get("adapter", "toy").from_config({})
    with pytest.raises(ValueError, match="cannot resize its class embedding"):
        check_classes(adapter.num_classes + 1, adapter, True, "data", log=lambda m: None)


def test_code_cache_says_its_class_count(tmp_path):
    from sar_core.data.classes import data_num_classes
    from sar_core.data.code_cache import CodeCacheDataset, build_code_cache
    from sar_plugins.datasets import ImageFolderDataset

    adapter = tiny_var()
    ds = ImageFolderDataset(_folder(tmp_path / "d", 12, per_class=1), image_size=16, augment=False)
    build_code_cache(adapter, ds, adapter.default_schedule, tmp_path / "cache")
    cache = CodeCacheDataset(tmp_path / "cache", adapter, adapter.default_schedule)
    assert data_num_classes(cache) == 12 and data_num_classes(ds) == 12
    assert data_num_classes(toy.ToyImages()) is None  # a dataset that does not say is not checked
