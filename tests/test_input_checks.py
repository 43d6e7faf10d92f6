"""Issue 19 item 6: silent wrong inputs are refused with one line (exit 2): `sar train`
without a tokenizer, a data / reference folder without the requested split, non-finite
pixels from a dataset."""

import numpy as np
import pytest
from PIL import Image

import toy_adapter as toy
from cli_asserts import one_error_line


def _train(out, *extra):
    return ["train", "-f", "toy", "--data", "toy-images", "--batch-size", "4", "--workers", "0", "--steps", "1",
            "--save-every", "0", "--loggers", "jsonl", "--device", "cpu", "--out", out, *extra]


# ----------------------------------------------------------------------------- tokenizer
def test_train_without_a_tokenizer_is_refused_unless_asked_for(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    one_error_line(toy.invoke(*_train(tmp_path / "a")), "--tokenizer", "--random-tokenizer")
    assert not (tmp_path / "a").exists()  # refused before anything was written
    r = toy.invoke(*_train(tmp_path / "b", "--random-tokenizer"))
    assert r.exit_code == 0, r.output
    assert "--random-tokenizer" in r.output  # said once, as a warning
    tok, bb = toy.toy_files(tmp_path)
    one_error_line(toy.invoke(*_train(tmp_path / "c", "--tokenizer", tok, "--random-tokenizer")), "not both")
    r = toy.invoke(*_train(tmp_path / "d", "--tokenizer", tok, "--backbone", bb))
    assert r.exit_code == 0, r.output
    r = toy.invoke("train", "--out", tmp_path / "b", "--resume", "--steps", "2")  # the run's own choice holds
    assert r.exit_code == 0, r.output


# ----------------------------------------------------------------------------- splits
def _image_folder(root, classes=("a", "b"), per_class=4, side=8):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def model(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    tok, bb = toy.toy_files(tmp_path)
    return ["-f", "toy", "--tokenizer", tok, "--backbone", bb, "--device", "cpu"]


def test_diagnose_on_a_folder_without_the_val_split_is_refused(tmp_path, model):
    train = _image_folder(tmp_path / "my" / "train")
    args = ["diagnose", *model, "--data", train, "--batches", "1", "--batch-size", "4"]
    line = one_error_line(toy.invoke(*args), str(train / "val"), "'val'", "--split .")
    assert "train" in line
    r = toy.invoke(*args, "--split", ".")  # the folder itself, said explicitly
    assert r.exit_code == 0, r.output
    r = toy.invoke("diagnose", *model, "--data", tmp_path / "my", "--split", "train", "--batches", "1",
                   "--batch-size", "4")
    assert r.exit_code == 0, r.output
    val = _image_folder(tmp_path / "other" / "val")  # a folder named like the split is that split
    r = toy.invoke("diagnose", *model, "--data", val, "--batches", "1", "--batch-size", "4")
    assert r.exit_code == 0, r.output


def test_eval_reference_without_the_split_is_refused_before_sampling(tmp_path, model, monkeypatch):
    from sar_core.evaluate import generation

    monkeypatch.setattr(generation, "iter_images", lambda *a, **k: pytest.fail("sampled first"))
    train = _image_folder(tmp_path / "ref" / "train")
    one_error_line(toy.invoke("eval", *model, "--reference", train, "--feature-extractor", "digit-classifier",
                              "-n", "4", "--metrics", "fid"), str(train / "val"), "--split .")


def test_open_dataset_never_reads_another_split(tmp_path, monkeypatch):
    """What study val sets, tokenize and training read through."""
    toy.use_registry(monkeypatch)
    from sar_core.data.datasets import open_dataset

    root = tmp_path / "data"
    _image_folder(root / "train")
    with pytest.raises(ValueError, match="no 'val' split"):
        open_dataset(root, split="val", image_size=8)
    with pytest.raises(ValueError, match="no 'val' split"):
        open_dataset(root / "train", split="val", image_size=8)
    with pytest.raises(ValueError, match="no 'train' split"):  # a val folder is not training data
        open_dataset(_image_folder(tmp_path / "x" / "val"), split="train", image_size=8)
    assert len(open_dataset(root, split="train", image_size=8)) == 8
    assert len(open_dataset(root / "train", split=".", image_size=8)) == 8
    assert len(open_dataset(_image_folder(tmp_path / "plain"), split="train", image_size=8)) == 8  # class folder


# ----------------------------------------------------------------------------- NaN pixels
class NanData:
    """Dataset ``toy-nan``: the toy images with item 5 all NaN and item 9 holding one Inf."""

    __name__ = "toy-nan-data"

    @staticmethod
    def _make(split="train", image_size=8, **_):
        ds = toy.ToyImages(n=16, image_size=image_size)
        ds.images[5] = float("nan")
        ds.images[9, 0, 0, 0] = float("inf")
        return ds

    from sar_core.hookspecs import hookimpl

    @hookimpl
    def register_datasets(self, register):
        register("toy-nan", self._make)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_non_finite_pixels_stop_training_naming_the_item(tmp_path, monkeypatch, workers):
    toy.use_registry(monkeypatch, NanData())
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", "toy-nan", "--batch-size", "4",
                   "--workers", workers, "--steps", "8", "--save-every", "0", "--loggers", "jsonl", "--device", "cpu",
                   "--out", out)
    line = one_error_line(r, "non-finite pixels", "NaN / Inf")
    assert "dataset item 5 " in line or "dataset item 9 " in line
    assert len(toy.read_metrics(out)) < 4  # stopped within the first epoch (16 items, 4 a batch)


def test_non_finite_pixels_are_not_cached(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, NanData())
    tok, bb = toy.toy_files(tmp_path)
    r = toy.invoke("tokenize", "-f", "toy", "--tokenizer", tok, "--backbone", bb, "--data", "toy-nan",
                   "--batch-size", "4", "--out", tmp_path / "cache")
    one_error_line(r, "dataset item 5 ", "non-finite pixels")
    assert not (tmp_path / "cache").exists()
