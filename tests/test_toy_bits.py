"""The core is generic: a family with a non-square schedule, bitwise codes and
variable-length text-feature conditions (``tests/toy_bits_adapter.py``) collates, caches,
trains, samples and is diagnosed through the CLI with nothing family-specific in sar_core."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import toy_adapter as toy
import toy_bits_adapter as bits
from sar_core.batch import Batch, Padded, collate


@pytest.fixture
def reg(monkeypatch):
    return toy.use_registry(monkeypatch, bits.PLUGIN)


@pytest.fixture
def files(tmp_path):
    return bits.toy_bits_files(tmp_path)


def _model(files):
    return ("-f", "toy-bits", "--tokenizer", files[0], "--backbone", files[1], "--device", "cpu")


def _train(out, data, files=None, *extra):
    model = ("--tokenizer", files[0], "--backbone", files[1]) if files else ("--random-tokenizer",)
    return toy.invoke("train", "-f", "toy-bits", *model, "--data", data, "--batch-size", "4", "--workers", "0",
                      "--loggers", "jsonl", "--steps", "2", "--lr", "1e-3", "--out", out, *extra)


def _finite_rows(out, student: bool) -> list:
    rows = toy.read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "loss_tf", "loss_csf", "grad_norm")), r
        assert r["skipped"] == 0 and r["loss_tf"] > 0 and (r["loss_csf"] > 0) == student
    return rows


# ------------------------------------------------------------------------- data path
def test_collate_pads_payloads_with_lengths_and_no_labels():
    feats = [torch.randn(n, 3) for n in (2, 5, 1)]
    b = collate([(torch.zeros(3, 4, 8), {"text_features": f}) for f in feats])
    assert b.labels is None and b.images.shape == (3, 3, 4, 8)
    p = b.conditions["text_features"]
    assert p.lengths.tolist() == [2, 5, 1] and p.values.shape == (3, 5, 3)
    assert all(torch.equal(a, f) for a, f in zip(p.unpadded(), feats))
    assert p.values[0, 2:].abs().sum() == 0 and p.values[2, 1:].abs().sum() == 0
    with_labels = collate([(torch.zeros(3, 2, 2), {"label": 4, "t": torch.ones(1, 2)}),
                           (torch.zeros(3, 2, 2), {"label": 1, "t": torch.ones(3, 2)})])
    assert with_labels.labels.tolist() == [4, 1] and with_labels.conditions["t"].lengths.tolist() == [1, 3]
    plain = collate([(torch.zeros(3, 2, 2), 3), (torch.zeros(3, 2, 2), torch.tensor(7))])
    assert plain.labels.tolist() == [3, 7] and plain.conditions == {}
    with pytest.raises(ValueError, match="same condition payloads"):
        collate([(torch.zeros(3, 2, 2), {"a": torch.ones(1, 2)}), (torch.zeros(3, 2, 2), {"b": torch.ones(1, 2)})])
    with pytest.raises(ValueError, match="class label"):
        collate([(torch.zeros(3, 2, 2), {"label": 1, "a": torch.ones(1, 2)}),
                 (torch.zeros(3, 2, 2), {"a": torch.ones(1, 2)})])


def test_condition_ignores_padding_and_null_rows_use_the_null_embedding():
    torch.manual_seed(0)
    a = bits.ToyBitsAdapter.from_config(bits.ToyBitsConfig())
    feats = [torch.randn(n, 6) for n in (2, 4)]
    batch = Batch(conditions={"text_features": Padded.pad(feats)})
    wide = Padded(torch.cat([batch.conditions["text_features"].values, torch.randn(2, 3, 6)], 1),
                  batch.conditions["text_features"].lengths)  # junk beyond the lengths
    s = a.default_schedule
    ds = bits.toy_text_images()
    codes = a.encode(torch.stack([ds[0][0], ds[1][0]]), s)
    inputs = a.teacher_inputs(codes, s)
    with a.inference():
        ref = a.forward(a.condition(batch), inputs, s)
        assert torch.allclose(a.forward(a.condition(Batch(conditions={"text_features": wide})), inputs, s), ref,
                              atol=1e-6)
        both = a.forward(a.cfg_condition(a.condition(batch)), torch.cat([inputs, inputs]), s)
        assert torch.allclose(both[:2], ref, atol=1e-6)
        assert not torch.allclose(both[2:], ref, atol=1e-3)  # the null condition differs ...
        null = a.forward(a.null_condition(a.condition(batch)), inputs, s)
        assert torch.allclose(both[2:], null, atol=1e-6)  # ... and is what null_condition gives
    assert ref.shape == (2, s.total_tokens, 2 * a.config.bits)
    a.condition_dropout = 0.3
    with pytest.raises(RuntimeError):
        with a.inference():
            assert a.backbone.text_drop == 0.0 and not a.backbone.training
            raise RuntimeError("inside")
    assert a.backbone.text_drop == 0.3 and a.backbone.training
    with pytest.raises(ValueError, match="text_features"):
        a.condition(Batch(labels=torch.tensor([1])))


def test_code_cache_stores_payloads_beside_bitwise_codes(tmp_path, reg):
    from sar_core.code_cache import CodeCacheDataset, StaleCacheError, build_code_cache

    torch.manual_seed(0)
    a = bits.ToyBitsAdapter.from_config(bits.ToyBitsConfig())
    ds = bits.toy_text_images(augment=False)
    build_code_cache(a, ds, None, tmp_path / "c", flips=True, batch_size=5)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["labels"] is False and meta["schedule"] == [[1, 1], [1, 2], [2, 3], [2, 4]]
    assert meta["conditions"]["text_features"] == {"tail": [6], "rows": sum(len(f) for f in ds.features)}
    assert not (tmp_path / "c" / "labels.npy").exists()
    cache = CodeCacheDataset(tmp_path / "c", a, flips="all")
    assert len(cache) == 2 * len(ds) and cache.labels is None
    for i in (0, 7, len(ds) + 3):
        codes, target = cache[i]
        src = i % len(ds)
        image = ds[src][0] if i < len(ds) else ds[src][0].flip(-1)
        want = a.encode(image[None], a.default_schedule)
        assert all(torch.equal(c, w[0]) for c, w in zip(codes, want))
        assert set(target) == {"text_features"} and torch.equal(target["text_features"], ds.features[src])
    b = collate([cache[i] for i in range(4)])
    assert b.labels is None and b.codes[2].shape == (4, 6, 4)
    assert b.conditions["text_features"].lengths.tolist() == [len(ds.features[i]) for i in range(4)]
    raw = tmp_path / "c" / "cond_text_features.bin"  # a truncated payload file is refused
    raw.write_bytes(raw.read_bytes()[:-4])
    with pytest.raises(StaleCacheError, match="text_features"):
        CodeCacheDataset(tmp_path / "c", a)


# ------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("rollout", ["ssr", "official"])
def test_sar_train_from_images(tmp_path, reg, rollout):
    r = _train(tmp_path / "run", "toy-text-images", None, "--rollout", rollout, "--image-size", "4x8")
    assert r.exit_code == 0, r.output
    _finite_rows(tmp_path / "run", student=True)
    start = bits.ToyBitsAdapter.from_config(bits.ToyBitsConfig())
    trained = bits.ToyBitsAdapter.load(*bits.toy_bits_files(tmp_path)[:1], tmp_path / "run" / "backbone.pth")
    assert trained.backbone.head.weight.shape == start.backbone.head.weight.shape == (8, 32)


def test_sar_tokenize_then_train_from_the_cache(tmp_path, reg, files):
    r = toy.invoke("tokenize", *_model(files), "--data", "toy-text-images", "--out", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["image_size"] == [4, 8] and meta["bits_per_token"] == 4 and "text_features" in meta["conditions"]
    assert np.load(tmp_path / "cache" / "codes_03.npy").shape == (24, 8, 4)
    r = _train(tmp_path / "run", tmp_path / "cache", files)
    assert r.exit_code == 0, r.output
    _finite_rows(tmp_path / "run", student=True)
    r = toy.invoke("tokenize", *_model(files), "--data", "toy-text-images", "--image-size", "4",
                   "--out", tmp_path / "c2")
    assert r.exit_code == 2 and "--image-size 4x8" in r.output
    r = _train(tmp_path / "bad", "toy-text-images", None, "--image-size", "8x4")
    assert r.exit_code == 2 and "8x4" in r.output and "4x8" in r.output
    r = _train(tmp_path / "bad", "toy-text-images", None, "--image-size", "4by8")
    assert r.exit_code == 2 and "HxW" in r.output


def test_sar_sample_with_text_features(tmp_path, reg, files):
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, 6, generator=g) for n in (1, 4, 2)]
    torch.save(feats, tmp_path / "list.pt")
    padded = Padded.pad(feats)
    torch.save({"features": padded.values, "lengths": padded.lengths}, tmp_path / "dict.pt")
    outs = {}
    for name in ("list", "dict"):
        r = toy.invoke("sample", *_model(files), "--text-features", tmp_path / f"{name}.pt", "--cfg", "2",
                       "--seed", "3", "--grid", tmp_path / f"{name}.png", "--folder", tmp_path / name,
                       "--batch-size", "2")
        assert r.exit_code == 0, r.output
        pngs = sorted((tmp_path / name).glob("*.png"))
        assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
        with Image.open(pngs[0]) as im:
            assert im.size == (8, 4)  # (W, H): the non-square schedule's images
        outs[name] = [np.asarray(Image.open(p)) for p in pngs]
    assert all(np.array_equal(a, b) for a, b in zip(outs["list"], outs["dict"]))
    r = toy.invoke("sample", *_model(files), "--per-class", "1", "--grid", tmp_path / "x.png")
    assert r.exit_code == 2 and "not class-conditional" in r.output
    torch.save({"features": torch.zeros(2, 3, 6)}, tmp_path / "bad.pt")
    r = toy.invoke("sample", *_model(files), "--text-features", tmp_path / "bad.pt", "--grid", tmp_path / "x.png")
    assert r.exit_code == 2 and "lengths" in r.output and not (tmp_path / "x.png").exists()


def test_generation_from_payloads_is_seeded(reg, files):
    from sar_core.generation import generate_images, load_adapter

    a = load_adapter("toy-bits", *files, device="cpu")
    feats = {"text_features": [torch.randn(n, 6) for n in (3, 1, 2, 5)]}
    x = generate_images(a, conditions=feats, seed=1, batch_size=3)
    assert x.shape == (4, 3, 4, 8) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, generate_images(a, conditions=feats, seed=1, batch_size=3))
    assert not torch.equal(x, generate_images(a, conditions=feats, seed=2, batch_size=3))
    with pytest.raises(ValueError, match="not class-conditional"):
        generate_images(a, torch.tensor([0, 1]))


def test_sar_diagnose_from_images_and_cache(tmp_path, reg, files):
    for data in ("toy-text-images", "cache"):
        if data == "cache":
            assert toy.invoke("tokenize", *_model(files), "--data", "toy-text-images", "--split", "val",
                              "--out", tmp_path / "cache").exit_code == 0
            data = str(tmp_path / "cache")
        out = tmp_path / f"gap-{len(data)}.json"
        r = toy.invoke("diagnose", *_model(files), "--data", data, "--batch-size", "4", "--batches", "2",
                       "--out", out)
        assert r.exit_code == 0, r.output
        rep = json.loads(out.read_text())
        assert rep["num_samples"] == 8 and [row["size"] for row in rep["scales"]] == [[1, 1], [1, 2], [2, 3], [2, 4]]
        assert all(math.isfinite(row["gap_ce"]) for row in rep["scales"][1:])
        assert all(0 <= row["tf_acc"] <= 1 for row in rep["scales"])
        if data.endswith("cache"):  # the cache holds the same codes and text features
            for a, b in zip(rep["scales"][1:], first["scales"][1:]):
                assert a["tf_ce"] == pytest.approx(b["tf_ce"], abs=1e-6)
                assert a["sf_ce"] == pytest.approx(b["sf_ce"], abs=1e-6)
        first = rep


def test_eval_samples_from_text_features_and_refuses_without_them(tmp_path, reg, files):
    from sar_core.evaluation import get_feature_extractor, evaluate_adapter
    from sar_core.generation import load_adapter

    torch.save([torch.randn(n, 6) for n in (1, 2, 3)], tmp_path / "t.pt")
    r = toy.invoke("eval", *_model(files), "--text-features", tmp_path / "t.pt", "--reference", "toy-text-images",
                   "--metrics", "fid,kid", "-n", "6", "--feature-extractor", "digit-classifier",
                   "--samples-folder", tmp_path / "s", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["num_generated"] == 6 and rep["image_size"] == [4, 8] and math.isfinite(rep["fid"])
    assert rep["num_classes"] is None and "class_accuracy" not in rep  # no classes to check
    assert len(list((tmp_path / "s").glob("*.png"))) == 6
    a = load_adapter("toy-bits", *files, device="cpu")
    with pytest.raises(ValueError, match="no classes.*text-features"):
        evaluate_adapter(a, num_samples=2, extractor=get_feature_extractor("digit-classifier"),
                         reference="toy-text-images")


def test_datasets_take_an_image_size_pair(tmp_path):
    from sar_core.data import image_hw, size_option
    from sar_plugins.datasets import imagefolder
    from sar_plugins.digits import digits

    assert image_hw(16) == (16, 16) and image_hw([4, 8]) == (4, 8) and size_option((5, 5)) == 5
    with pytest.raises(ValueError, match="positive"):
        image_hw((0, 3))
    d = digits("val", (6, 12))
    assert d[0][0].shape == (3, 6, 12) and digits("val", 16)[0][0].shape == (3, 16, 16)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / c / "x.png")
    for augment in (True, False):
        ds = imagefolder(str(tmp_path), image_size=(8, 12), augment=augment)
        assert ds[0][0].shape == (3, 8, 12) and ds[1][1] == 1
