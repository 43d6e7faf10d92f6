"""Run checkpoints: bit-exact resume, atomic writes, keep-last-N, Ctrl-C, non-finite guard."""

import math

import pytest
import torch

from sar_core.train import checkpointing as ckpt
from sar_core.train.config import build_config
from sar_core.hookspecs import hookimpl
from sar_core.sar.losses import HardCSFL
from sar_core.train.trainer import Trainer

import toy_adapter as toy

# every source of randomness on: class dropout, dropout, random schedules, random flips,
# a guided top-k sampled rollout on a random transition, gradient accumulation, EMA
HARD = ["--schedule", "toy-random", "--cond-drop", "0.2", "--set", "model.overrides.dropout=0.1",
        "--rollout", "ssr", "--ssr-scales", "random", "--rollout-sampling", "sample", "--rollout-cfg", "1.5",
        "--rollout-top-k", "8", "--gamma", "0.5", "--grad-accum", "2", "--ema", "0.9", "--lr", "3e-3",
        "--warmup-steps", "2", "--lr-end", "1e-4", "--steps", "4", "--save-every", "2"]


def _args(out, *extra):
    tok = [] if "--tokenizer" in map(str, extra) else ["--random-tokenizer"]  # a fresh one unless given
    return ["train", "-f", "toy", *tok, "--data", "toy-images", "--batch-size", "4", "--loggers", "jsonl",
            "--out", out, *HARD, *extra]


class _CrashAt:
    """A plugin whose on_step_end raises at one step (a crash after logging it)."""

    def __init__(self, step: int):
        self.__name__ = f"crash-at-{step}"
        self.step = step

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == self.step:
            raise RuntimeError(f"simulated crash at step {step}")


def _final(out):
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    return state, toy.read_metrics(out)


def _assert_same_run(a, b):
    (sa, ma), (sb, mb) = a, b
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == list(range(1, 5))
    for x, y in zip(ma, mb):
        for k in ("loss", "loss_tf", "loss_csf", "grad_norm", "lr"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])  # bit-identical, not approximately
    assert sa["step"] == sb["step"] == 4
    for part in ("model",):
        assert all(torch.equal(sa[part][k], sb[part][k]) for k in sa[part])
    assert all(torch.equal(sa["ema"]["shadow"][k], sb["ema"]["shadow"][k]) for k in sa["ema"]["shadow"])
    ea, eb = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(ea[i]["exp_avg_sq"], eb[i]["exp_avg_sq"]) for i in ea)


def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    straight = tmp_path / "straight"
    r = toy.invoke(*_args(straight, "--workers", "0"))
    assert r.exit_code == 0, r.output
    ref = _final(straight)
    losses = [m["loss_csf"] for m in ref[1]]
    assert len(set(losses)) == 4 and all(v > 0 for v in losses)

    crashed = tmp_path / "crashed"
    toy.use_registry(monkeypatch, _CrashAt(3))
    r = toy.invoke(*_args(crashed, "--workers", "0"))
    assert r.exit_code != 0 and "simulated crash" in str(r.exception)
    assert [s for s, _ in ckpt.list_checkpoints(crashed / "checkpoints")] == [2]
    assert len(toy.read_metrics(crashed)) == 3  # step 3 was logged, then lost
    # resume with a different worker count: items are seeded per (epoch, index), not per worker
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", crashed, "--resume", "--workers", "2")
    assert r.exit_code == 0, r.output
    assert "resumed from" in r.output and "step 2" in r.output
    _assert_same_run(ref, _final(crashed))


class _InterruptingLoss(HardCSFL):
    """Raises KeyboardInterrupt (a Ctrl-C) on its n-th call, once per process."""

    calls = 0
    at = 3
    name = "interrupting"

    def __call__(self, sp, bits, label_smoothing=0.0):
        type(self).calls += 1
        if type(self).calls == type(self).at:
            raise KeyboardInterrupt
        return super().__call__(sp, bits, label_smoothing)


class _LossPlugin:
    def __init__(self, name, cls):
        self.__name__, self.cls, self.loss_name = f"loss-{name}", cls, name

    @hookimpl
    def register_losses(self, register):
        register(self.loss_name, self.cls)


def test_ctrl_c_mid_step_saves_a_resumable_checkpoint(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    ref_dir = tmp_path / "ref"
    assert toy.invoke(*_args(ref_dir, "--workers", "0")).exit_code == 0
    ref = _final(ref_dir)

    toy.use_registry(monkeypatch, _LossPlugin("interrupting", _InterruptingLoss))
    _InterruptingLoss.calls = 0
    out = tmp_path / "int"
    # 2 micro-steps per step: call 3 is the first micro-step of step 2 (no checkpoint yet)
    r = toy.invoke(*_args(out, "--workers", "0", "--csfl", "interrupting"))
    assert r.exit_code == 130, r.output
    assert "interrupted at step 1" in r.output and "--resume" in r.output
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [1]
    _InterruptingLoss.at = -1
    r = toy.invoke("train", "--out", out, "--resume")
    assert r.exit_code == 0, r.output
    _assert_same_run(ref, _final(out))


def _trainer(tmp_path, monkeypatch, **train):
    reg = toy.use_registry(monkeypatch)
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images", "workers": 0},
                        "train": {"batch_size": 4, "loggers": [], **train}, "out": str(tmp_path / "run")})
    return Trainer(cfg, registry=reg, log=lambda m: None)


def test_a_killed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch, steps=3, save_every=1)
    tr.train_step()
    tr.step = 1
    first = tr.save()
    good = first.read_bytes()
    tr.train_step()
    tr.step = 2

    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # writes part of the file, then the process "dies"
        f.write(b"\x80\x02partial checkpoint bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        tr.save()
    monkeypatch.setattr(torch, "save", real_save)
    files = sorted(p.name for p in (tr.ckpt_dir).iterdir())
    assert files == ["step_00000001.pt"]  # no step 2, no temp file left behind
    assert first.read_bytes() == good
    assert ckpt.load_latest(tr.ckpt_dir)["step"] == 1


def test_ctrl_c_during_a_periodic_save_keeps_complete_checkpoints(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch, steps=4, save_every=2)
    real_save = torch.save
    calls = []

    def flaky(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:  # the step-4 save and the save on interrupt both die
            f.write(b"junk")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky)
    res = tr.run()
    assert res.status == "interrupted" and "newest complete checkpoint" in res.message
    monkeypatch.setattr(torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(tr.ckpt_dir)] == [2]
    assert sorted(p.name for p in tr.ckpt_dir.iterdir()) == ["step_00000002.pt"]
    assert ckpt.load_checkpoint(res.checkpoint)["step"] == 2


def test_keep_last_and_latest(tmp_path, monkeypatch):
    tr = _trainer(tmp_path, monkeypatch, steps=4, save_every=1, keep_last=2)
    res = tr.run()
    assert res.status == "finished"
    assert [s for s, _ in ckpt.list_checkpoints(tr.ckpt_dir)] == [3, 4]
    assert res.checkpoint == ckpt.checkpoint_path(tr.ckpt_dir, 4)
    (tr.ckpt_dir / "step_00000009.pt").write_bytes(b"garbage")  # unreadable newest file
    warnings = []
    assert ckpt.load_latest(tr.ckpt_dir, warn=warnings.append)["step"] == 4 and warnings


class _NaNLoss(HardCSFL):
    """Returns NaN on calls listed in ``bad`` (1-based)."""

    calls = 0
    bad: set = set()
    name = "nan-sometimes"

    def __call__(self, sp, bits, label_smoothing=0.0):
        type(self).calls += 1
        out = super().__call__(sp, bits, label_smoothing)
        return out * float("nan") if type(self).calls in type(self).bad else out


def test_nonfinite_steps_are_skipped_and_stop_the_run(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch, _LossPlugin("nan-sometimes", _NaNLoss))
    _NaNLoss.calls, _NaNLoss.bad = 0, {3, 5, 6}
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4", "--workers", "0",
                   "--loggers", "jsonl", "--out", out, "--csfl", "nan-sometimes", "--steps", "10",
                   "--save-every", "1", "--max-nonfinite", "2")
    assert r.exit_code == 1
    assert "update skipped" in r.output and "2 consecutive non-finite steps" in r.output
    rows = toy.read_metrics(out)
    assert [m["skipped"] for m in rows] == [0, 0, 1, 0, 1, 1]
    assert rows[2]["loss"] is None and rows[3]["loss"] is not None and math.isfinite(rows[3]["loss"])
    # the newest checkpoint is the last good step; skipped steps did not touch the weights
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")][-1] == 4
    assert not (out / "backbone.pth").exists()
    s2, s4 = (ckpt.load_checkpoint(ckpt.checkpoint_path(out / "checkpoints", s)) for s in (2, 4))
    assert any(not torch.equal(s2["model"][k], s4["model"][k]) for k in s2["model"])  # step 4 trained


def test_skipped_steps_leave_weights_and_optimizer_untouched(tmp_path, monkeypatch):
    reg = toy.use_registry(monkeypatch, _LossPlugin("nan-sometimes", _NaNLoss))
    _NaNLoss.calls, _NaNLoss.bad = 0, {2}
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images", "workers": 0},
                        "loss": {"name": "nan-sometimes"},
                        "train": {"batch_size": 4, "loggers": [], "max_nonfinite_total": 1, "steps": 5},
                        "out": str(tmp_path / "run")})
    tr = Trainer(cfg, registry=reg, log=lambda m: None)
    tr.train_step()
    tr.step = 1
    before = {k: v.clone() for k, v in tr.backbone.state_dict().items()}
    opt_steps = tr.optimizer.state[next(iter(tr.backbone.parameters()))]["step"].clone()
    m = tr.train_step()
    assert m["skipped"] == 1 and math.isnan(m["loss"])
    assert all(torch.equal(before[k], v) for k, v in tr.backbone.state_dict().items())
    assert torch.equal(tr.optimizer.state[next(iter(tr.backbone.parameters()))]["step"], opt_steps)
    assert tr._guard(m) and "in total" in tr._guard(m)
