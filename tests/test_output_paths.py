"""Issue 19 item 7: output paths are checked before any work (a bad one loses no sampling
pass), a write that fails after the work is one ``error:`` line with exit status 2, and a
full disk during an atomic write says "no space left on device"."""

import errno
import os

import pytest
import torch

import toy_adapter as toy
from sar_core import checkpoint_io
from cli_asserts import one_error_line


@pytest.fixture
def model(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    tok, bb = toy.toy_files(tmp_path)
    return ["-f", "toy", "--tokenizer", tok, "--backbone", bb, "--device", "cpu"]


@pytest.fixture
def sampled(monkeypatch):
    """Counts the sampling passes the CLI starts."""
    from sar_core.evaluate import generation, inputs

    calls = []
    real_gen, real_iter = generation.generate_images, generation.iter_images

    def gen(*a, **k):
        calls.append("generate")
        return real_gen(*a, **k)

    def it(*a, **k):
        calls.append("iter")
        return real_iter(*a, **k)

    monkeypatch.setattr(generation, "generate_images", gen)
    monkeypatch.setattr(generation, "iter_images", it)
    return calls


def read_only(monkeypatch, root):
    """What a read-only mount answers under ``root`` (root ignores permission bits)."""
    real_open = os.open

    def fake(path, flags, *a, **k):
        if str(path).startswith(str(root)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", fake)


def test_sample_grid_with_an_extension_pil_cannot_write_fails_before_sampling(tmp_path, model, sampled):
    r = toy.invoke("sample", *model, "--labels", "1,2", "--grid", tmp_path / "x.pth")
    one_error_line(r, "--grid", ".pth", ".png")
    assert sampled == []
    r = toy.invoke("sample", *model, "--labels", "1,2", "--grid", tmp_path / "g.png")
    assert r.exit_code == 0 and (tmp_path / "g.png").is_file() and sampled[:1] == ["generate"]


def test_sample_into_a_read_only_folder_fails_before_sampling(tmp_path, model, sampled, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    one_error_line(toy.invoke("sample", *model, "--labels", "1", "--folder", ro / "imgs"),
                   "--folder", "Read-only file system")
    one_error_line(toy.invoke("sample", *model, "--labels", "1", "--grid", ro / "g.png"), "--grid")
    (tmp_path / "afile").write_text("x")
    one_error_line(toy.invoke("sample", *model, "--labels", "1", "--folder", tmp_path / "afile"),
                   "--folder", "is a file")
    assert sampled == []


def test_eval_out_unwritable_fails_before_sampling(tmp_path, model, sampled, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    common = [*model, "--reference", "toy-images", "--feature-extractor", "digit-classifier", "-n", "4",
              "--metrics", "fid"]
    one_error_line(toy.invoke("eval", *common, "--out", ro / "report.json"), "--out", str(ro))
    one_error_line(toy.invoke("eval", *common, "--samples-folder", ro / "s"), "--samples-folder")
    one_error_line(toy.invoke("eval", *common, "--out", tmp_path), "--out", "is a folder")
    assert sampled == []


def test_diagnose_outputs_are_checked_before_the_passes(tmp_path, model, monkeypatch):
    from sar_core.evaluate import diagnostics

    ran = []
    monkeypatch.setattr(diagnostics, "exposure_gap", lambda *a, **k: ran.append(1))
    common = [*model, "--data", "toy-images", "--split", "train", "--batches", "1", "--batch-size", "4"]
    one_error_line(toy.invoke("diagnose", *common, "--plot", tmp_path / "gap.pth"), "--plot", ".pth")
    (tmp_path / "f").write_text("x")
    one_error_line(toy.invoke("diagnose", *common, "--out", tmp_path / "f" / "r.json"), "--out", "is a file")
    assert ran == []


def test_a_write_error_after_sampling_is_one_line(tmp_path, model, monkeypatch):
    from sar_core.evaluate import generation

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "g.png"))

    monkeypatch.setattr(generation, "save_grid", full)
    one_error_line(toy.invoke("sample", *model, "--labels", "1", "--grid", tmp_path / "g.png"),
                   "no space left on device", "g.png", "--grid")


def test_a_full_disk_in_an_atomic_write_says_no_space_left_on_device(tmp_path, monkeypatch):
    """torch reports a full disk as a zip-writer error; the free space is what the write met
    (measured while its partial temp file still holds the space), not what is free after."""
    def free_mb(folder):
        return 0.2 if list(tmp_path.glob(".f.pt.*.tmp")) else 5000.0

    def zip_error(obj, f, *a, **k):
        f.write(b"x" * 64)
        f.flush()
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_io, "_free_mb", free_mb)
    monkeypatch.setattr(torch, "save", zip_error)
    with pytest.raises(checkpoint_io.WriteError, match="no space left on device") as info:
        checkpoint_io.atomic_save({"x": 1}, tmp_path / "f.pt")
    assert "free some space" in str(info.value) and "--resume" in str(info.value)
    assert list(tmp_path.glob(".f.pt.*")) == []


def test_pretrain_study_tokenize_and_conformance_outputs_are_checked_first(tmp_path, model, monkeypatch):
    from pathlib import Path

    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    cfg = tmp_path / "m.yaml"
    cfg.write_text("depth: 1\n")
    one_error_line(toy.invoke("pretrain", "-f", "var", "--model-config", cfg, "--out", ro / "p"), "--out", str(ro))
    one_error_line(toy.invoke("study", "--preset", "demo", "--out", ro / "s"), "--out", "Read-only file system")
    assert not (ro / "s").exists()
    one_error_line(toy.invoke("tokenize", *model, "--data", "toy-images", "--out", ro / "c"), "--out")
    fixtures = Path(__file__).parent / "fixtures" / "var"
    one_error_line(toy.invoke("conformance", fixtures, "--dump", ro / "d.pt"), "--dump")
