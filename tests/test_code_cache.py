"""Code cache: equals a direct encode (originals and mirrors), refuses stale use, CLI."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset
from typer.testing import CliRunner

from sar_cli.main import app

from sar_core.data.code_cache import (
    CodeCacheDataset, StaleCacheError, build_code_cache, read_meta, tokenizer_fingerprint,
)
from sar_plugins.digits import digits

FIX = Path(__file__).parent / "fixtures" / "var"


@pytest.fixture(scope="module")
def data():
    return Subset(digits("val", 64), range(10))


@pytest.fixture(scope="module")
def cache(var, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cc") / "cache"
    return build_code_cache(var, data, var.default_schedule, out, flips=True, batch_size=4,
                            tokenizer_file=FIX / "vae_ch32v64z8.pth")


def test_cache_equals_direct_encode_with_flips(var, data, cache):
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.stack([data[i][1] for i in range(len(data))])
    direct = var.encode(images, var.default_schedule)
    mirror = var.encode(images.flip(-1), var.default_schedule)
    ds = CodeCacheDataset(cache, var, var.default_schedule, flips="all")
    assert len(ds) == 20
    for i in range(10):
        codes, label = ds[i]
        codes_f, label_f = ds[10 + i]
        assert all(c.dtype == torch.int64 for c in codes)
        assert all(torch.equal(c, d[i]) for c, d in zip(codes, direct))
        assert all(torch.equal(c, d[i]) for c, d in zip(codes_f, mirror))
        assert int(label) == int(labels[i]) == int(label_f)
    # the mirror image really has other codes (the test would be vacuous otherwise)
    assert not torch.equal(direct[-1], mirror[-1])


def test_meta_records_what_the_cache_belongs_to(var, cache):
    meta = read_meta(cache)
    assert meta["family"] == "var" and meta["schedule"] == [1, 2, 3, 4, 6, 8]
    assert meta["image_size"] == [64, 64] and meta["num_items"] == 20 and meta["flips"] is True
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(var.tokenizer)
    assert meta["dtype"] == "uint16"  # vocab 64 fits
    assert len(meta["tokenizer_file_sha256"]) == 64
    arr = np.load(cache / "codes_05.npy", mmap_mode="r")
    assert arr.shape == (20, 64) and arr.dtype == np.uint16


def test_flip_modes_and_batching(var, cache):
    none = CodeCacheDataset(cache, flips="none")
    allf = CodeCacheDataset(cache, flips="all")
    assert len(none) == 10
    torch.manual_seed(0)
    rnd = CodeCacheDataset(cache, flips="random")
    picks = [rnd[3][0][-1] for _ in range(30)]
    n_orig = sum(torch.equal(p, allf[3][0][-1]) for p in picks)
    n_flip = sum(torch.equal(p, allf[13][0][-1]) for p in picks)
    assert n_orig + n_flip == 30 and 0 < n_flip < 30
    codes, labels = next(iter(DataLoader(none, batch_size=4)))
    assert [tuple(c.shape) for c in codes] == [(4, n * n) for n in (1, 2, 3, 4, 6, 8)]
    assert torch.equal(labels, none.labels[:4])


def test_stale_schedule_and_tokenizer_are_refused(var, cache):
    with pytest.raises(StaleCacheError, match="schedule"):
        CodeCacheDataset(cache, var, "1_2_3_4_6")
    from sar_adapters.var.adapter import VARAdapter

    other = VARAdapter.load(FIX / "vae_ch32v64z8.pth", FIX / "var_tiny_d2w64.pth")
    with torch.no_grad():
        next(other.tokenizer.parameters()).add_(1e-3)
    with pytest.raises(StaleCacheError, match="tokenizer weights differ"):
        CodeCacheDataset(cache, other)
    CodeCacheDataset(cache, var, var.default_schedule)  # the right pair still opens


def test_damaged_cache_is_refused(cache, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    (copy / "codes_02.npy").unlink()
    with pytest.raises(StaleCacheError, match="codes_02"):
        CodeCacheDataset(copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["version"] = 0
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleCacheError, match="version"):
        CodeCacheDataset(copy)
    with pytest.raises(FileNotFoundError, match="sar tokenize"):
        CodeCacheDataset(tmp_path)


def test_wrong_image_size_and_existing_folder(var, cache, tmp_path):
    with pytest.raises(ValueError, match="16x16"):
        build_code_cache(var, Subset(digits("val", 16), range(2)), None, tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))
    with pytest.raises(FileExistsError, match="overwrite"):
        build_code_cache(var, Subset(digits("val", 64), range(2)), None, cache)


def _tiny_var():
    from sar_adapters.var.adapter import VARAdapter
    from sar_adapters.var.config import VARConfig

    torch.manual_seed(0)
    return VARAdapter.from_config(VARConfig(vocab_size=32, Cvae=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1,
                                            depth=1, embed_dim=32, num_heads=2, num_classes=10,
                                            patch_nums=(1, 2, 4)))


def test_tokenize_cli(tmp_path):
    from sar_adapters.var.adapter import VARAdapter

    small = _tiny_var()
    small.save(tmp_path / "tok.pth", tmp_path / "bb.pth")
    cmd = ["tokenize", "-f", "var", "--tokenizer", str(tmp_path / "tok.pth"),
           "--backbone", str(tmp_path / "bb.pth"), "--data", "digits", "--split", "val", "--image-size", "16",
           "--out", str(tmp_path / "cache"), "--device", "cpu"]
    r = CliRunner().invoke(app, cmd)
    assert r.exit_code == 0, r.output
    loaded = VARAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
    ds = CodeCacheDataset(tmp_path / "cache", loaded, loaded.default_schedule)
    assert len(ds) == 179 and ds.meta["flips"] is False
    image, label = digits("val", 16)[100]
    direct = loaded.encode(image[None], loaded.default_schedule)
    assert all(torch.equal(c, d[0]) for c, d in zip(ds[100][0], direct)) and int(ds[100][1]) == int(label)
    bad = CliRunner().invoke(app, cmd[:-4] + ["--image-size", "32", "--out", str(tmp_path / "c2")])
    assert bad.exit_code == 2 and "--image-size 32" in bad.output.replace("\n", " ")


def test_folder_cache_is_deterministic(tmp_path):
    """An image folder is cached without random crops / flips, identically every time."""
    from PIL import Image

    from sar_core.data.datasets import open_dataset

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / "train" / cls).mkdir(parents=True)
        for j in range(3):
            arr = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / "train" / cls / f"{j}.png")
    small = _tiny_var()
    ds = open_dataset(tmp_path / "imgs", split="train", image_size=16, deterministic=True)
    assert len(ds) == 6 and ds[0][0].shape == (3, 16, 16)
    a = build_code_cache(small, ds, None, tmp_path / "a")
    b = build_code_cache(small, ds, None, tmp_path / "b")
    for k in range(3):
        assert np.array_equal(np.load(a / f"codes_{k:02d}.npy"), np.load(b / f"codes_{k:02d}.npy"))
    assert np.load(a / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]


def test_version_1_caches_still_read_as_labels_only(var, cache, tmp_path):
    import json
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(cache, old)
    meta = json.loads((old / "meta.json").read_text())
    meta["version"] = 1
    del meta["labels"], meta["conditions"]
    (old / "meta.json").write_text(json.dumps(meta))
    a, b = CodeCacheDataset(old, var, flips="none"), CodeCacheDataset(cache, var, flips="none")
    assert torch.equal(a.labels, b.labels) and int(a[2][1]) == int(b[2][1]) and a.condition_names == []
    meta["version"] = 0
    (old / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StaleCacheError, match="version"):
        CodeCacheDataset(old, var)
