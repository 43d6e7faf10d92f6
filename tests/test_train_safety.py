"""Nothing silent, nothing lost in `sar train`: resume checks, the run-folder lock, the
good-checkpoint guard, one-line errors (exit 2, stderr) with a checkpoint, umask, temp files."""

import errno
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sar_core import checkpoint_io
from sar_core.train import checkpointing as ckpt
from sar_core.sar.losses import HardCSFL
from sar_core.hookspecs import hookimpl

import toy_adapter as toy
from cli_asserts import one_error_line as _one_error_line

HERE = Path(__file__).parent


def _base(out, *extra):
    tok = [] if "--tokenizer" in map(str, extra) else ["--random-tokenizer"]  # a fresh one unless given
    return ["train", "-f", "toy", *tok, "--data", "toy-images", "--batch-size", "4", "--workers", "0",
            "--loggers", "jsonl", "--out", out, *extra]


# ----------------------------------------------------------------------------- 6. resume
def test_config_stores_absolute_paths_and_resume_works_from_another_directory(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    toy.toy_files(work)
    monkeypatch.chdir(work)
    r = toy.invoke(*_base("runs/a", "--tokenizer", "toy_tok.pt", "--backbone", "toy_bb.pt", "--steps", "1"))
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((work / "runs/a/config.yaml").read_text())
    assert saved["model"]["tokenizer"] == str(work / "toy_tok.pt")
    assert saved["model"]["backbone"] == str(work / "toy_bb.pt") and saved["out"] == str(work / "runs/a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = toy.invoke("train", "--out", work / "runs/a", "--resume", "--steps", "2")
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in toy.read_metrics(work / "runs/a")] == [1, 2]


def test_resume_refuses_another_model_or_data_and_warns_each_changed_hyperparameter(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    tok, bb = toy.toy_files(tmp_path)
    (tmp_path / "o").mkdir()
    _, other = toy.toy_files(tmp_path / "o")
    out = tmp_path / "run"
    start = ["--tokenizer", tok, "--backbone", bb, "--lr", "1e-3", "--rollout", "ssr"]
    assert toy.invoke(*_base(out, *start, "--steps", "1")).exit_code == 0
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "2", "--backbone", other)
    _one_error_line(r, "model.backbone", str(bb), str(other), "the run's own model and data flags", "another --out")
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "2", "--data", "digits")
    _one_error_line(r, "data.name", "'toy-images'", "'digits'")
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "2", "--set", "model.overrides.dropout=0.1")
    _one_error_line(r, "model.overrides")
    assert [m["step"] for m in toy.read_metrics(out)] == [1]  # nothing trained on a refused resume
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "3", "--lr", "2e-3", "--rollout", "official",
                   "--workers", "1")
    assert r.exit_code == 0, r.output
    warns = [ln for ln in r.stdout.splitlines() if ln.startswith("warning: --resume:")]
    assert "warning: --resume: optim.lr changed from 0.001 to 0.002" in warns
    assert "warning: --resume: rollout.name changed from 'ssr' to 'official'" in warns
    assert "warning: --resume: train.steps changed from 1 to 3" in warns
    assert len(warns) == 3  # workers is not a hyper-parameter


def test_resume_of_a_missing_run_folder_is_one_line(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", tmp_path / "nope", "--resume")
    _one_error_line(r, str(tmp_path / "nope"), "does not exist", "drop --resume")
    (tmp_path / "empty").mkdir()
    r = toy.invoke("train", "--out", tmp_path / "empty", "--resume")
    _one_error_line(r, "no config.yaml")


# ----------------------------------------------------------------------------- 8. lock
_HOLD = ("import sys, time; from sar_core.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('locked', flush=True); time.sleep(120)")


def test_a_live_run_folder_is_locked_and_a_stale_lock_is_taken_over(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    assert toy.invoke(*_base(out, "--steps", "1")).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=HERE.parent)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = toy.invoke(*_base(out, "--steps", "2", "--resume"))
        _one_error_line(r, "in use by another run", f"pid {holder.pid}", "another --out")
        r = toy.invoke(*_base(out, "--steps", "2"))
        _one_error_line(r, f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert [m["step"] for m in toy.read_metrics(out)] == [1]
    r = toy.invoke(*_base(out, "--steps", "2", "--resume"))  # the holder died: its lock is stale
    assert r.exit_code == 0, r.output
    assert f"taking over the stale lock of pid {holder.pid}" in r.stdout
    assert (out / ".lock").read_text() == ""  # released cleanly


# ----------------------------------------------------------------------------- 9. good checkpoint
class _NaNAt(HardCSFL):
    """Returns NaN on the calls listed in ``bad`` (1-based)."""

    calls, bad = 0, set()
    name = "nan-at"

    def __call__(self, sp, bits, label_smoothing=0.0):
        type(self).calls += 1
        out = super().__call__(sp, bits, label_smoothing)
        return out * float("nan") if type(self).calls in type(self).bad else out


class _NaNPlugin:
    __name__ = "nan-at"

    @hookimpl
    def register_losses(self, register):
        register("nan-at", _NaNAt)


def test_good_checkpoint_is_finite_before_the_first_nonfinite_step_and_kept(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, _NaNPlugin())
    # step 3 is the run's first non-finite step; steps 4, 5 train and save; 6, 7 stop the run
    _NaNAt.calls, _NaNAt.bad = 0, {3, 6, 7}
    out = tmp_path / "run"
    r = toy.invoke(*_base(out, "--csfl", "nan-at", "--steps", "10", "--save-every", "1", "--keep-last", "2",
                          "--max-nonfinite", "2"))
    assert r.exit_code == 1, r.output
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4, 5]  # 2 survived keep-last 2
    err = r.stderr
    assert "the first non-finite step was 3" in err and "newest good checkpoint: step 2" in err
    assert str(ckpt.checkpoint_path(out / "checkpoints", 2)) in err and "steps 4, 5" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", 5))
    assert state["nonfinite"]["first"] == 3 and state["nonfinite"]["good"] == 2


def test_a_checkpoint_with_nonfinite_weights_is_not_good(tmp_path, monkeypatch):
    from sar_core.train.config import build_config
    from sar_core.train.trainer import Trainer

    reg = toy.use_registry(monkeypatch)
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images", "workers": 0},
                        "train": {"batch_size": 4, "loggers": [], "steps": 3, "keep_last": 1},
                        "out": str(tmp_path / "run")})
    logs = []
    tr = Trainer(cfg, registry=reg, log=logs.append)
    tr.step = 1
    tr.save()
    assert tr.nonfinite["good"] == 1
    with torch.no_grad():
        next(tr.backbone.parameters()).fill_(float("inf"))
    tr.step = 2
    tr.save()
    assert tr.nonfinite["good"] == 1 and any("not finite" in m for m in logs)
    assert [s for s, _ in ckpt.list_checkpoints(tr.ckpt_dir)] == [1, 2]  # keep_last 1, the good one kept
    assert ckpt.weights_finite({"a": torch.ones(2)}) and not ckpt.weights_finite({"a": torch.tensor([math.nan])})
    mask = {"attn_bias": torch.tensor([0.0, -math.inf])}  # an additive attention mask is -inf by design
    assert ckpt.weights_finite(mask, frozenset({"attn_bias"})) and not ckpt.weights_finite(mask)
    assert not ckpt.weights_finite({"attn_bias": torch.tensor([math.nan])}, frozenset({"attn_bias"}))


def test_var_checkpoint_with_its_mask_buffer_is_good(tmp_path):
    """VAR keeps a -inf attention-mask buffer; its checkpoints are still good ones."""
    from sar_core.train.config import build_config
    from sar_core.plugins import get_registry
    from sar_core.train.trainer import Trainer

    tiny = {"vocab_size": 16, "Cvae": 8, "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "using_sa": False,
            "using_mid_sa": False, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 10,
            "patch_nums": [1, 2]}
    cfg = build_config({"model": {"family": "var", "overrides": tiny},
                        "data": {"name": "digits", "image_size": 4, "workers": 0},
                        "train": {"steps": 1, "batch_size": 2, "save_every": 1, "loggers": []},
                        "out": str(tmp_path / "run")})
    tr = Trainer(cfg, get_registry())
    assert any(torch.isinf(b).any() for b in tr.backbone.buffers())
    tr.run()
    assert tr.nonfinite["good"] == 1


# ----------------------------------------------------------------------------- 10. errors
def _image_folder(root: Path, n: int = 4) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


class _CorruptAt:
    """At the end of step ``step``, overwrites every image of ``root`` with junk."""

    __name__ = "corrupt-at"

    def __init__(self, root: Path, step: int):
        self.root, self.step = root, step

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == self.step:
            for f in self.root.rglob("*.png"):
                f.write_bytes(b"not a png")


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_mid_run_is_one_line_with_a_checkpoint(tmp_path, monkeypatch, workers):
    import re

    root = tmp_path / "imgs"
    _image_folder(root)
    toy.use_registry(monkeypatch, _CorruptAt(root, 2))
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", root, "--batch-size", "2", "--workers", str(workers),
                   "--loggers", "jsonl", "--out", out, "--save-every", "0", "--steps", "20")
    line = _one_error_line(r, "reading the training data failed at step", "cannot identify image file",
                           "fix or remove that file", "--resume")
    failed = int(re.search(r"failed at step (\d+)", line).group(1))
    assert failed >= 3  # a worker may have read a batch or two ahead
    done = failed - 1
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [done]
    assert f"saved {ckpt.checkpoint_path(out / 'checkpoints', done)}" in line
    assert [m["step"] for m in toy.read_metrics(out)] == list(range(1, done + 1))
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", done))
    assert state["step"] == done and state["data"]["epoch"] * 4 + state["data"]["batch"] == done  # 4 a epoch


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    real, calls = torch.save, []

    def full(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the step-2 checkpoint
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full)
    r = toy.invoke(*_base(out, "--steps", "3", "--save-every", "1"))
    _one_error_line(r, "no space left on device", "step_00000002.pt", "free some space", "--resume")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt"]
    # the miniz error torch raises on a really full disk reads the same
    monkeypatch.setattr(checkpoint_io, "_free_mb", lambda d: 0.2)
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"x"), _raise(RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))))
    with pytest.raises(checkpoint_io.WriteError, match="no space left on device"):
        checkpoint_io.atomic_save({"x": 1}, tmp_path / "f.pt")
    assert list(tmp_path.glob(".f.pt.*")) == []


def _raise(exc):
    raise exc


def test_a_full_disk_while_logging_metrics_is_one_line(tmp_path, monkeypatch):
    reg = toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    jsonl = reg.get("logger", "jsonl")
    real = jsonl.log

    def log(self, step, metrics):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out / "metrics.jsonl"))
        return real(self, step, metrics)

    monkeypatch.setattr(jsonl, "log", log)
    r = toy.invoke(*_base(out, "--steps", "3", "--save-every", "1"))
    _one_error_line(r, "no space left on device", "metrics.jsonl", "--resume")
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]


def test_a_read_only_out_is_one_line(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def read_only_open(path, flags, *a, **k):  # what a read-only mount answers (root ignores modes)
        if str(path).startswith(str(ro)) and flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only_open)
    r = toy.invoke(*_base(ro, "--steps", "1"))
    _one_error_line(r, "cannot write to the run folder", str(ro), "Read-only file system", "writable --out")
    monkeypatch.setattr(os, "open", real_open)
    if os.geteuid() != 0:
        ro.chmod(0o555)
        try:
            r = toy.invoke(*_base(ro / "run", "--steps", "1"))
            _one_error_line(r, "cannot write to the run folder", str(ro / "run"), "Permission denied")
        finally:
            ro.chmod(0o755)


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = toy.invoke(*_base(tmp_path / "run", "--steps", "1", "--device", "cuda"))
    _one_error_line(r, "--device cuda", "no CUDA GPU", "--device cpu")
    r = toy.invoke(*_base(tmp_path / "run", "--steps", "1", "--device", "tpu9"))
    _one_error_line(r, "not a device")
    assert not (tmp_path / "run").exists()


def test_temp_files_of_interrupted_writes_are_removed_on_start(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    assert toy.invoke(*_base(out, "--steps", "1")).exit_code == 0
    left = [out / "checkpoints" / ".step_00000002.pt.x1y2z3.tmp", out / ".config.yaml.abc_12.tmp"]
    for f in left:
        f.write_bytes(b"half a checkpoint")  # what a SIGKILL mid-write leaves
    keep = out / "checkpoints" / "notes.tmp"
    keep.write_text("a user's file")
    r = toy.invoke(*_base(out, "--steps", "2", "--resume"))
    assert r.exit_code == 0, r.output
    assert "removed 2 temp file(s)" in r.stdout
    assert not any(f.exists() for f in left) and keep.exists()


# ----------------------------------------------------------------------------- 11. umask
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        a = checkpoint_io.atomic_save({"x": torch.ones(1)}, tmp_path / "a.pt")
        b = checkpoint_io.atomic_write_text("hi", tmp_path / "b.txt")
    finally:
        os.umask(old)
    assert (a.stat().st_mode & 0o777) == mode and (b.stat().st_mode & 0o777) == mode


def test_a_run_folder_is_readable_by_the_group(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    old = os.umask(0o002)
    try:
        out = tmp_path / "run"
        assert toy.invoke(*_base(out, "--steps", "1")).exit_code == 0
    finally:
        os.umask(old)
    for f in (out / "config.yaml", ckpt.latest_checkpoint(out / "checkpoints"), out / "backbone.pth"):
        assert (f.stat().st_mode & 0o777) == 0o664, f
