"""Validation during training: sar train --eval-every / --eval-at-end (sar_core.train.periodic_eval)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sar_core.train import checkpointing as ckpt
from sar_core.train.curves import eval_panels, smooth, smoothing_weight

import toy_adapter as toy
import toy_bits_adapter as bits
from cli_asserts import one_error_line
from test_train_resume import HARD, _CrashAt


@pytest.fixture(autouse=True)
def _default_at_end(monkeypatch):
    monkeypatch.delenv("SAR_EVAL_AT_END", raising=False)  # conftest turns it off for the rest of the suite


def _args(out, *extra):
    return ["train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4", "--loggers",
            "jsonl", "--workers", "0", "--out", out, *HARD, *extra]


def _evals(out) -> list[dict]:
    return [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def _weights(out) -> dict:
    return ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["model"]


TRAIN_KEYS = ("loss", "loss_tf", "loss_csf", "grad_norm", "lr", "skipped")


def test_evals_change_no_training_and_a_resumed_run_is_bit_exact(tmp_path, monkeypatch):
    """Every source of randomness on (HARD: random schedules, dropout, class dropout, sampled
    rollout, flips): a run with evals (steps 3 and 4), one with evals crashed after the eval of
    step 3 and resumed from step 2, and one without evals train the same weights and log the
    same metrics.jsonl, bit for bit; the two eval series are the same too."""
    toy.use_registry(monkeypatch)
    ev = ("--eval-every", "3", "--eval-images", "8", "--set", "eval.grid=4")
    straight, crashed, plain = tmp_path / "straight", tmp_path / "crashed", tmp_path / "plain"
    assert toy.invoke(*_args(straight, *ev)).exit_code == 0
    r = toy.invoke(*_args(plain, "--no-eval-at-end"))
    assert r.exit_code == 0, r.output
    assert not (plain / "eval.jsonl").exists() and not (plain / "curves.png").exists()

    toy.use_registry(monkeypatch, _CrashAt(3))
    assert toy.invoke(*_args(crashed, *ev)).exit_code != 0
    assert [e["step"] for e in _evals(crashed)] == [3]  # evaluated, then the step was lost
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", crashed, "--resume")
    assert r.exit_code == 0, r.output
    assert "eval at step 3 (" in r.output and "eval at step 4 (" in r.output  # the cost is in the log line

    a, b, c = (toy.read_metrics(d) for d in (straight, crashed, plain))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [m["step"] for m in c] == [1, 2, 3, 4]
    for x, y, z in zip(a, b, c):
        for k in TRAIN_KEYS:
            assert x[k] == y[k] == z[k], (x["step"], k)
    wa, wb, wc = (_weights(d) for d in (straight, crashed, plain))
    assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa)

    ea, eb = _evals(straight), _evals(crashed)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [3, 4]  # the lost step's line was redone once
    assert [e["metrics"] for e in ea] == [e["metrics"] for e in eb]
    m = ea[0]["metrics"]
    parts = ea[0]["cost_s"].values()  # each rounded to 1 ms, as wall_s is: allow half a ms each
    assert ea[0]["num_images"] == 8 and ea[0]["wall_s"] >= sum(parts) - 0.0005 * (len(parts) + 1) and sum(parts) > 0
    assert set(ea[0]["cost_s"]) == {"gap", "grid", "curves"}
    assert len(m["gap"]) == 3 and m["val_loss_tf"] > 0  # toy: 4 scales, a gap per transition
    assert ea[0]["metrics"] != ea[1]["metrics"]  # the weights moved between the evals
    for out in (straight, crashed):
        assert (out / "eval" / "grid-step3.png").is_file() and (out / "eval" / "grid-step4.png").is_file()
        assert (out / "curves.png").is_file()


def test_the_same_grid_every_time_and_fid_on_samples(tmp_path, monkeypatch):
    """With the learning rate ~0 the weights stay, so two evals of one run draw the same grid
    (same labels, same seed); --eval-samples adds FID / precision / recall (and class accuracy
    from a classifying extractor) against the validation images."""
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4",
                   "--workers", "0", "--loggers", "jsonl", "--steps", "2", "--lr", "1e-30", "--eval-every", "1",
                   "--eval-images", "8", "--eval-samples", "10", "--feature-extractor", "digit-classifier",
                   "--out", out)
    assert r.exit_code == 0, r.output
    rows = _evals(out)
    assert [e["step"] for e in rows] == [1, 2]  # no second eval at the end: step 2 was evaluated
    m = rows[0]["metrics"]
    assert {"fid", "precision", "recall", "f_score", "class_acc"} <= set(m) and m["fid"] >= 0
    assert rows[0]["cost_s"]["samples"] > 0
    assert rows[0]["metrics"] == rows[1]["metrics"]
    g1, g2 = (np.asarray(Image.open(out / "eval" / f"grid-step{s}.png").convert("RGB")) for s in (1, 2))
    # the title names the step; below it the 16 samples must be pixel-identical
    assert g1.shape == g2.shape and (g1[60:] == g2[60:]).all() and (g1 != g2).any()
    assert "fid" in r.output.lower() or "FID" in r.output


def test_text_family_grid_uses_the_first_validation_conditions(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, bits.PLUGIN)
    out = tmp_path / "text"
    r = toy.invoke("train", "-f", "toy-bits", "--random-tokenizer", "--data", "toy-text-images", "--batch-size",
                   "4", "--workers", "0", "--loggers", "jsonl", "--steps", "1", "--eval-images", "6",
                   "--set", "eval.grid=3", "--out", out)
    assert r.exit_code == 0, r.output
    (row,) = _evals(out)  # at the end, by default: the data has a val split
    assert row["step"] == 1 and row["num_images"] == 6 and row["grid"] == "eval/grid-step1.png"
    assert (out / "curves.png").is_file()


def _image_folder(root, splits):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_at_end_follows_the_val_split_and_missing_val_data_is_one_line(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    base = ["train", "-f", "toy", "--random-tokenizer", "--batch-size", "4", "--workers", "0", "--loggers",
            "jsonl", "--steps", "1"]
    train_only = _image_folder(tmp_path / "train_only", ["train"])
    r = toy.invoke(*base, "--data", train_only, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "a" / "eval.jsonl").exists()  # no val split: no eval by default

    with_val = _image_folder(tmp_path / "with_val", ["train", "val"])
    r = toy.invoke(*base, "--data", with_val, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert [e["num_images"] for e in _evals(tmp_path / "b")] == [4]  # all 4 images of val/
    monkeypatch.setenv("SAR_EVAL_AT_END", "false")  # what the rest of the suite runs with
    assert toy.invoke(*base, "--data", with_val, "--out", tmp_path / "b2").exit_code == 0
    assert not (tmp_path / "b2" / "eval.jsonl").exists()
    monkeypatch.delenv("SAR_EVAL_AT_END")

    r = toy.invoke(*base, "--data", train_only, "--eval-every", "1", "--out", tmp_path / "c")
    assert r.exit_code == 2
    msg = one_error_line(r)
    assert "validation data" in msg and "--val-data" in msg and "'val'" in msg
    assert not (tmp_path / "c" / "metrics.jsonl").exists()  # refused before step 1

    r = toy.invoke(*base, "--data", train_only, "--val-data", with_val / "val", "--eval-every", "1",
                   "--out", tmp_path / "d")
    assert r.exit_code == 0, r.output
    assert [e["step"] for e in _evals(tmp_path / "d")] == [1]


def test_smoothing_and_eval_panels():
    assert smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)  # debiased: no pull towards 0
    s = smooth([0.0, 10.0, 0.0, 10.0] * 10, 0.9)
    assert max(s[10:]) - min(s[10:]) < 5  # the zig-zag is damped
    assert smoothing_weight(10) == 0 and 0 < smoothing_weight(1000) <= 0.98
    rows = [{"step": 1, "metrics": {"val_loss_tf": 1.0, "gap_mean": 0.1, "gap": [0.1, 0.2], "fid": None,
                                    "precision": 0.5, "recall": 0.4, "f_score": 0.45}},
            {"step": 2, "metrics": {"val_loss_tf": 0.9, "fid": 3.0}}]
    assert eval_panels(rows) == [("val_loss_tf",), ("gap_mean",), ("precision", "recall", "f_score"), ("fid",)]


def test_a_code_cache_as_val_data_and_a_stop_signal_skips_the_eval(tmp_path, monkeypatch):
    import signal

    from sar_core.data.code_cache import build_code_cache
    from sar_core.train.config import build_config
    from sar_core.train.trainer import Trainer

    reg = toy.use_registry(monkeypatch)
    tok, bb = toy.toy_files(tmp_path)
    adapter = toy.ToyAdapter.load(tok, bb)
    cache = build_code_cache(adapter, toy.toy_images(hflip=False, n=6), None, tmp_path / "cache", tokenizer_file=tok)
    cfg = build_config({"model": {"family": "toy", "tokenizer": str(tok), "backbone": str(bb)},
                        "data": {"name": "toy-images", "workers": 0},
                        "train": {"batch_size": 4, "steps": 1, "loggers": []},
                        "eval": {"every": 1, "data": str(cache), "grid": 2}, "out": str(tmp_path / "run")})
    logged = []
    trainer = Trainer(cfg, registry=reg, log=logged.append)
    assert trainer.run().status == "finished"
    (row,) = _evals(tmp_path / "run")
    assert row["num_images"] == 6 and row["metrics"]["val_loss_tf"] > 0
    trainer.stop.signum = signal.SIGTERM  # a stop signal arrives: the eval under way is given up
    assert trainer.evals.evaluate(2) is None
    assert [e["step"] for e in _evals(tmp_path / "run")] == [1] and "eval at step 2 skipped" in logged[-1]


def test_fsdp_refuses_asked_evals_and_drops_the_default_one():
    from types import SimpleNamespace

    from sar_core.train.config import build_config
    from sar_core.train.periodic_eval import PeriodicEval

    def fake(**eval_):
        cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images"}, "eval": eval_,
                            "dist": {"strategy": "fsdp"}})
        return SimpleNamespace(config=cfg, env=SimpleNamespace(enabled=True))

    with pytest.raises(ValueError, match="--dist ddp"):
        PeriodicEval.for_run(fake(every=10))
    assert PeriodicEval.for_run(fake()) is None  # at-end by default: off under FSDP2, no error
