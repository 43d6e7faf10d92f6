"""sar compare: a toy run folder against its start checkpoint (and the start against itself),
paired differences that agree with the per-seed / per-image numbers they come from, the
zero-spread rule, the pictures, and bad input as one error line."""

import json

import pytest
import torch

import toy_adapter as toy
from sar_core.hookspecs import hookimpl
from sar_core.study.stats import interval, verdict


class _FixedImages:
    """Dataset ``toy-fixed``: the toy images without random flips (validation data)."""

    __name__ = "toy-fixed-images"

    @hookimpl
    def register_datasets(self, register):
        register("toy-fixed", lambda split="val", image_size=8, **_: toy.ToyImages(image_size=image_size, hflip=False))


FIXED = _FixedImages()

SMALL = ["--feature-extractor", "digit-classifier", "--samples-per-class", "2", "--seeds", "0-2",
         "--val-images", "12", "--batch-size", "16", "--metrics", "fid,prc", "--data", "toy-fixed",
         "--grid-rows", "1", "--cfg", "1.0"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    import pytest as _pytest

    mp = _pytest.MonkeyPatch()
    toy.use_registry(mp, FIXED)
    tmp = tmp_path_factory.mktemp("compare")
    tok, bb = toy.toy_files(tmp)
    run = tmp / "run"
    res = toy.invoke("train", "-f", "toy", "--tokenizer", tok, "--backbone", bb, "--data", "toy-images",
                     "--steps", "3", "--batch-size", "8", "--lr", "3e-3", "--rollout", "ssr", "--gamma", "0.5",
                     "--workers", "0", "--loggers", "jsonl", "--out", run)
    assert res.exit_code == 0, res.output
    out = tmp / "cmp"
    # the start file (family and tokenizer from the run folder), the run, the start again
    res = toy.invoke("compare", bb, run, bb, *SMALL, "--out", out)
    yield res, out, tok, bb, run
    mp.undo()


def test_compare_prints_paired_differences_with_noise(compared):
    res, out, *_ = compared
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "paired differences to toy_bb" in text and "95% interval" in text and "excludes 0:" not in text
    result = json.loads((out / "compare.json").read_text())
    assert [m["name"] for m in result["models"]] == ["toy_bb", "run", "toy_bb-2"]
    assert result["models"][1]["family"] == "toy" and result["models"][0]["tokenizer"] == result["models"][1]["tokenizer"]
    d = result["differences"]["run"]
    assert {"fid", "precision", "recall", "f_score", "class_acc", "val_loss_tf", "gap_mean", "gap_acc"} <= set(d)
    seeds_a, seeds_b = (result["models"][i]["per_sampling_seed"] for i in (0, 1))
    assert sorted(seeds_a) == ["0", "1", "2"] == sorted(seeds_b)
    per_seed = [seeds_b[s]["fid"] - seeds_a[s]["fid"] for s in ("0", "1", "2")]
    assert d["fid"]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert d["fid"]["verdict"] == verdict(interval(per_seed), False)
    for key, diff in d.items():  # a verdict word exactly when the interval excludes 0
        assert (diff["verdict"] in ("better", "worse")) == bool(diff["excludes_zero"]), key
    # the trained run changed its predictions: the val-loss difference is not zero
    assert d["val_loss_tf"]["mean"] != 0 and d["val_loss_tf"]["noise"] > 0
    assert len(result["per_scale"]["run"]) == 3  # scales 1..3 of the toy's four
    md = (out / "compare.md").read_text()
    assert "| val TF loss ↓ |" in md and "95% interval" in md and "![samples](grids.png)" in md
    for name in ("grids.png", "maps.png", "models/run/grid.png", "models/run/maps/all_scales.png"):
        assert (out / name).is_file(), name


def test_a_model_against_itself_is_never_called_different(compared):
    """The same checkpoint twice: every paired difference is exactly 0 with zero spread,
    so every interval is undefined and no verdict says better or worse."""
    res, out, *_ = compared
    result = json.loads((out / "compare.json").read_text())
    same = result["differences"]["toy_bb-2"]
    for key, d in same.items():
        assert d["mean"] == 0 and d["low"] is None and d["verdict"] == "undefined", key


def test_values_match_sar_diagnose_on_the_same_images(compared):
    """The reference's val TF loss is the token-weighted TF CE of `exposure_gap` on the first
    12 validation images (what `sar diagnose` computes)."""
    from sar_core.evaluate.diagnostics import exposure_gap
    from sar_core.evaluate.generation import load_adapter

    _, out, tok, bb, _ = compared
    result = json.loads((out / "compare.json").read_text())
    adapter = load_adapter("toy", tok, bb, device="cpu")
    data = toy.ToyImages(hflip=False)
    images = torch.stack([data[i][0] for i in range(12)])
    labels = torch.stack([data[i][1] for i in range(12)])
    gap = exposure_gap(adapter, [(images, labels)], adapter.default_schedule)
    counts = adapter.default_schedule.token_counts
    want = sum(r["tf_ce"] * n for r, n in zip(gap["scales"], counts)) / sum(counts)
    assert result["models"][0]["values"]["val_loss_tf"]["value"] == pytest.approx(want, rel=1e-6)
    assert result["models"][0]["values"]["gap_mean"]["value"] == pytest.approx(gap["mean_gap_ce"], rel=1e-6)


def test_bad_input_is_one_error_line(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, FIXED)
    res = toy.invoke("compare", tmp_path / "nothing", tmp_path / "also-nothing")
    assert res.exit_code == 2 and "not found" in res.output
    tok, bb = toy.toy_files(tmp_path)
    res = toy.invoke("compare", bb)
    assert res.exit_code == 2 and "at least two models" in res.output
    res = toy.invoke("compare", bb, bb, "--tokenizer", tok)
    assert res.exit_code == 2 and "pass -f FAMILY" in res.output
    res = toy.invoke("compare", bb, bb, "-f", "toy", "--tokenizer", tok, "--seeds", "3", "--data", "toy-fixed")
    assert res.exit_code == 2 and "at least 2 sampling seeds" in res.output


def test_text_to_image_models_are_compared_on_their_validation_captions(tmp_path):
    """A family without classes (tiny Infinity, textimages data): every model is sampled on
    the validation captions' features, FID is taken against those images, grids carry the
    captions; the same checkpoint twice differs by exactly 0 everywhere (undefined)."""
    from pathlib import Path

    from test_infinity_data import make_folder

    fix = Path(__file__).parent / "fixtures" / "infinity"
    make_folder(tmp_path / "val", n=3, sizes=((64, 64),))
    bb = fix / "infinity_tiny_d4c4w64.pth"
    out = tmp_path / "cmp"
    res = toy.invoke("compare", bb, bb, "-f", "infinity", "--tokenizer", fix / "infinity_vae_d16_tiny.pth",
                     "--data", f"textimages:{tmp_path / 'val'}", "--seeds", "0,1", "--text-samples", "4",
                     "--metrics", "fid", "--feature-extractor", "digit-classifier", "--cfg", "1.0",
                     "--grid-rows", "1", "--no-maps", "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    s = result["settings"]
    assert s["conditions"] == "validation captions" and s["samples"] == 4 and s["val_images"] == 3
    assert "first 3 validation images" in s["reference_images"]
    assert result["models"][0]["per_sampling_seed"]["0"]["fid"] > 0
    assert all(d["verdict"] == "undefined" for d in result["differences"]["infinity_tiny_d4c4w64-2"].values())
    assert (out / "grids.png").is_file() and "captions of the validation images" in (out / "compare.md").read_text()
