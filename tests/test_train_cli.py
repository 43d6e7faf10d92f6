"""`sar train` end to end on CPU: every rollout x loss, the var adapter, configs, data paths."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sar_core.hookspecs import hookimpl

import toy_adapter as toy

VAR_FIX = Path(__file__).parent / "fixtures" / "var"
KEYS = ("step", "loss", "loss_tf", "loss_csf", "lr", "grad_norm", "images_per_s", "tokens_per_s")

COMBOS = [("none", None, "hard")] + [
    (r, s, l) for r, s in (("ssr", "all"), ("ssr", "last"), ("ssr", "random"), ("official", None))
    for l in ("hard", "soft", "naive")]


@pytest.fixture
def reg(monkeypatch):
    return toy.use_registry(monkeypatch)


def _base(out, *extra):
    tok = [] if "--tokenizer" in map(str, extra) else ["--random-tokenizer"]  # a fresh one unless given
    return ["train", "-f", "toy", *tok, "--data", "toy-images", "--batch-size", "4", "--workers", "0",
            "--loggers", "jsonl", "--out", out, *extra]


def _check_metrics(out: Path, steps: int, gamma: float, student: bool) -> list[dict]:
    rows = toy.read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        for k in KEYS:
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]), (k, r)
        assert r["skipped"] == 0 and r["loss_tf"] > 0
        assert r["loss"] == pytest.approx(r["loss_tf"] + gamma * r["loss_csf"])
        assert (r["loss_csf"] > 0) == student
    return rows


@pytest.mark.parametrize("rollout,scales,loss", COMBOS, ids=[f"{r}-{s}-{l}" for r, s, l in COMBOS])
def test_every_rollout_and_loss_trains_two_steps(tmp_path, reg, rollout, scales, loss):
    out = tmp_path / "run"
    args = _base(out, "--steps", "2", "--rollout", rollout, "--csfl", loss, "--gamma", "0.5", "--lr", "1e-3")
    if scales:
        args += ["--ssr-scales", scales]
    if rollout == "official":  # a small vocabulary: sample from the top 8, guided
        args += ["--rollout-top-k", "8"]
    r = toy.invoke(*args)
    assert r.exit_code == 0, r.output
    _check_metrics(out, 2, 0.5, student=rollout != "none")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["rollout"]["name"] == rollout and saved["loss"]["name"] == loss and saved["loss"]["gamma"] == 0.5
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002.pt"]
    # the exported backbone loads through the family's loader and differs from the start
    tok, bb = toy.toy_files(tmp_path)
    start = toy.ToyAdapter.load(tok, bb).backbone.state_dict()
    trained = toy.ToyAdapter.load(tok, out / "backbone.pth").backbone.state_dict()
    assert not torch.equal(start["head.weight"], trained["head.weight"])


@pytest.mark.parametrize("rollout", ["ssr", "official"])
def test_var_adapter_trains_from_upstream_files(tmp_path, rollout):
    from sar_core.plugins import get_registry

    out = tmp_path / "var"
    r = toy.invoke("train", "-f", "var", "--tokenizer", VAR_FIX / "vae_ch32v64z8.pth",
                   "--backbone", VAR_FIX / "var_tiny_d2w64.pth", "--data", "digits", "--image-size", "64",
                   "--steps", "2", "--batch-size", "2", "--workers", "0", "--rollout", rollout,
                   "--rollout-sampling", "argmax", "--gamma", "0.1", "--lr", "1e-3", "--ema", "0.9",
                   "--loggers", "jsonl", "--out", out)
    assert r.exit_code == 0, r.output
    _check_metrics(out, 2, 0.1, student=True)
    cls = get_registry().get("adapter", "var")
    before = cls.load(VAR_FIX / "vae_ch32v64z8.pth", VAR_FIX / "var_tiny_d2w64.pth").backbone.state_dict()
    after = cls.load(VAR_FIX / "vae_ch32v64z8.pth", out / "backbone.pth").backbone.state_dict()
    ema = cls.load(VAR_FIX / "vae_ch32v64z8.pth", out / "backbone_ema.pth").backbone.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "head.weight" in changed
    # EMA (decay 0.9 over two steps) lies strictly between start and end for a moved weight
    k = "head.weight"
    d_ema, d_end = (ema[k] - before[k]).abs().sum(), (after[k] - before[k]).abs().sum()
    assert 0 < d_ema < d_end


def test_print_config_merges_file_flags_and_set(tmp_path, reg):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"family": "var"}, "data": {"name": "digits"},
                                        "optim": {"lr": 5e-5, "warmup_steps": 10}, "train": {"steps": 7}}))
    r = toy.invoke("train", "--config", cfg_file, "--lr", "3e-4", "--rollout", "official", "--csfl", "soft",
                   "--set", "loss.temperature=2", "--set", "optim.hold_fraction=0.05", "--betas", "0.8,0.9",
                   "--print-config")
    assert r.exit_code == 0, r.output
    cfg = yaml.safe_load(r.output)
    assert cfg["model"]["family"] == "var" and cfg["train"]["steps"] == 7
    assert cfg["optim"]["lr"] == 3e-4 and cfg["optim"]["warmup_steps"] == 10 and cfg["optim"]["hold_fraction"] == 0.05
    assert cfg["optim"]["betas"] == [0.8, 0.9]
    assert cfg["rollout"]["name"] == "official" and cfg["loss"] == {"name": "soft", "temperature": 2.0,
                                                                    "gamma": 0.5, "label_smoothing": 0.0}
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nfamily = "toy"\n[data]\nname = "toy-images"\n[train]\nbatch_size = 6\n')
    r = toy.invoke("train", "--config", toml, "--print-config")
    assert r.exit_code == 0 and yaml.safe_load(r.output)["train"]["batch_size"] == 6


def test_invalid_config_is_reported_without_traceback(tmp_path, reg):
    r = toy.invoke(*_base(tmp_path / "x", "--steps", "-3", "--amp", "fp17", "--set", "optim.lrr=1"))
    assert r.exit_code == 2
    assert "invalid run config" in r.output and "train.steps" in r.output and "greater than 0" in r.output
    assert "train.amp" in r.output and "fp17" in r.output and "optim.lrr: unknown field" in r.output
    assert "Traceback" not in r.output
    r = toy.invoke("train", "--data", "digits", "--print-config")
    assert r.exit_code == 2 and "model: Field required" in r.output
    r = toy.invoke(*_base(tmp_path / "y", "--rollout", "nope"))
    assert r.exit_code == 2 and "no rollout named 'nope'" in r.output and "official" in r.output
    r = toy.invoke(*_base(tmp_path / "z", "--csfl", "hard", "--csfl-temperature", "2"))
    assert r.exit_code == 2 and "loss 'hard'" in r.output
    r = toy.invoke(*_base(tmp_path / "w", "--batch-size", "5", "--grad-accum", "2"))
    assert r.exit_code == 2 and "not divisible" in r.output
    r = toy.invoke(*_base(tmp_path / "v", "--image-size", "16"))
    assert r.exit_code == 2 and "does not match the model" in r.output
    assert not (tmp_path / "v" / "checkpoints").exists()


def test_rerun_into_a_used_folder_needs_resume(tmp_path, reg):
    out = tmp_path / "run"
    assert toy.invoke(*_base(out, "--steps", "1")).exit_code == 0
    r = toy.invoke(*_base(out, "--steps", "2"))
    assert r.exit_code == 2 and "--resume" in r.output
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "2")  # config.yaml of the run is the base
    assert r.exit_code == 0, r.output
    assert [m["step"] for m in toy.read_metrics(out)] == [1, 2]


def _write_image_folder(root: Path, n_per_class: int = 3, size: int = 12) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_dataset_and_training_from_a_folder(tmp_path, reg):
    from sar_plugins.datasets import ImageFolderDataset

    root = tmp_path / "imgs"
    _write_image_folder(root)
    ds = ImageFolderDataset(root, image_size=8)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6 and ds.augment
    x, y = ds[4]
    assert x.shape == (3, 8, 8) and y.item() == 1 and -1 <= x.min() < x.max() <= 1
    val = ImageFolderDataset(root, split=".", image_size=8)  # the folder itself, not augmented
    assert not val.augment and torch.equal(val[0][0], val[0][0])
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", root, "--steps", "2", "--batch-size", "2", "--workers", "0",
                   "--loggers", "jsonl", "--out", out)
    assert r.exit_code == 0, r.output
    _check_metrics(out, 2, 0.5, student=True)  # the default gamma
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolderDataset(root / "cat")


def test_training_from_a_code_cache(tmp_path, reg):
    from sar_core.data.code_cache import build_code_cache

    tok, bb = toy.toy_files(tmp_path)
    adapter = toy.ToyAdapter.load(tok, bb)
    cache = build_code_cache(adapter, toy.ToyImages(n=8, image_size=8), None, tmp_path / "cache")
    out = tmp_path / "run"
    common = ["train", "-f", "toy", "--tokenizer", tok, "--backbone", bb, "--steps", "2", "--batch-size", "4",
              "--workers", "0", "--loggers", "jsonl"]
    r = toy.invoke(*common, "--data", cache, "--out", out)
    assert r.exit_code == 0, r.output
    _check_metrics(out, 2, 0.5, student=True)  # the default gamma
    r = toy.invoke(*common, "--data", cache, "--schedule", "toy-random", "--out", tmp_path / "r2")
    assert r.exit_code == 2 and "code cache holds one schedule" in r.output


class _Recorder:
    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    @hookimpl
    def on_train_start(self, run):
        self.calls.append(("start", run.step, run.total_steps, run.out_dir))

    @hookimpl
    def on_step_end(self, step, metrics):
        self.calls.append(("step", step, metrics["loss"]))

    @hookimpl
    def on_checkpoint_saved(self, path):
        self.calls.append(("ckpt", Path(path).name, Path(path).is_file()))

    @hookimpl
    def on_train_end(self, run):
        self.calls.append(("end", run.step))


def test_run_time_hooks_fire_in_order(tmp_path, monkeypatch):
    rec = _Recorder()
    toy.use_registry(monkeypatch, rec)
    out = tmp_path / "run"
    r = toy.invoke(*_base(out, "--steps", "3", "--save-every", "2"))
    assert r.exit_code == 0, r.output
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["start", "step", "step", "ckpt", "step", "ckpt", "end"]
    assert rec.calls[0] == ("start", 0, 3, out)
    assert rec.calls[3] == ("ckpt", "step_00000002.pt", True) and rec.calls[5][1] == "step_00000003.pt"
    assert [c[2] for c in rec.calls if c[0] == "step"] == [m["loss"] for m in toy.read_metrics(out)]
