"""`sar train -f infinity` on the tiny public checkpoints with a tiny text-feature dataset:
rollouts x losses with and without BSC give finite losses; a crashed BSC + SAR run resumes
bit-exactly; the exported backbone strict-loads into the upstream key layout."""

import math
from pathlib import Path

import pytest
import torch

import toy_adapter as toy
from sar_core.train import checkpointing as ckpt
from sar_core.hookspecs import hookimpl
from test_infinity_data import make_folder

FIX = Path(__file__).parent / "fixtures" / "infinity"
MODEL = ("-f", "infinity", "--tokenizer", FIX / "infinity_vae_d16_tiny.pth",
         "--backbone", FIX / "infinity_tiny_d4c4w64.pth", "--device", "cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("textimages")
    make_folder(root, n=4, sizes=((64, 64), (96, 80)))
    return root


def _train(out, data, *extra):
    return toy.invoke("train", *MODEL, "--data", f"textimages:{data}",
                      "--batch-size", "2", "--workers", "0", "--loggers", "jsonl", "--lr", "1e-4",
                      "--gamma", "0.5", "--out", out, *extra)


# every rollout x loss runs in the contract suite and test_infinity_sar; here each rollout once
# through the CLI, with and without BSC
RUNS = [("ssr", "hard", 4), ("official", "soft", 0), ("none", "hard", 13)]


@pytest.mark.parametrize("rollout,loss,bsc", RUNS)
def test_train_rollouts_losses_with_and_without_bsc(tmp_path, data, rollout, loss, bsc):
    out = tmp_path / "run"
    r = _train(out, data, "--rollout", rollout, "--csfl", loss, "--steps", "2",
               "--set", f"model.overrides.bsc_layers={bsc}")
    assert r.exit_code == 0, r.output
    rows = toy.read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_tf", "loss_csf", "grad_norm")), m
        assert m["loss_tf"] > 0 and (m["loss_csf"] > 0) == (rollout != "none")
    saved = torch.load(out / "backbone.pth", weights_only=True)
    upstream = torch.load(FIX / "infinity_tiny_d4c4w64.pth", weights_only=True)
    assert set(saved) == set(upstream)
    assert all(saved[k].shape == upstream[k].shape for k in upstream)
    assert not torch.equal(saved["head.weight"], upstream["head.weight"])   # it trained


class _CrashAt:
    def __init__(self, step):
        self.__name__, self.step = f"crash-at-{step}", step

    @hookimpl
    def on_step_end(self, step, metrics):
        if step == self.step:
            raise RuntimeError(f"simulated crash at step {step}")


def test_bsc_sar_run_resumes_bit_exactly(tmp_path, data, monkeypatch):
    args = ("--rollout", "ssr", "--rollout-sampling", "sample", "--rollout-cfg", "2.0", "--csfl", "hard",
            "--steps", "3", "--save-every", "1", "--set", "model.overrides.bsc_layers=5")
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = _train(straight, data, *args)
    assert r.exit_code == 0, r.output
    toy.use_registry(monkeypatch, _CrashAt(2))
    r = _train(crashed, data, *args)
    assert r.exit_code != 0 and "simulated crash" in str(r.exception)
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", crashed, "--resume")
    assert r.exit_code == 0, r.output
    a, b = toy.read_metrics(straight), toy.read_metrics(crashed)
    assert [m["step"] for m in b][-1] == 3
    last_a = {m["step"]: m for m in a}
    last_b = {m["step"]: m for m in b}
    for s in (2, 3):
        for k in ("loss", "loss_tf", "loss_csf", "grad_norm"):
            assert last_a[s][k] == last_b[s][k], (s, k)
    sa = ckpt.load_checkpoint(ckpt.latest_checkpoint(straight / "checkpoints"))
    sb = ckpt.load_checkpoint(ckpt.latest_checkpoint(crashed / "checkpoints"))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_every_command_on_text_features(tmp_path, data):
    """tokenize (with text payloads) -> train on the code cache; diagnose, sample, eval."""
    spec = f"textimages:{data}"
    r = toy.invoke("tokenize", *MODEL, "--data", spec, "--out", tmp_path / "codes")
    assert r.exit_code == 0, r.output
    r = toy.invoke("train", *MODEL, "--data", tmp_path / "codes", "--batch-size", "2", "--workers", "0",
                   "--loggers", "jsonl", "--steps", "1", "--rollout", "ssr", "--csfl", "soft", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert math.isfinite(toy.read_metrics(tmp_path / "run")[0]["loss_csf"])
    r = toy.invoke("diagnose", *MODEL, "--data", spec, "--split", "train")
    assert r.exit_code == 0 and "mean gap" in r.output, r.output
    torch.save([torch.randn(3, 256) * 0.3, torch.randn(5, 256) * 0.3], tmp_path / "prompts.pt")
    r = toy.invoke("sample", *MODEL, "--text-features", tmp_path / "prompts.pt", "--cfg", "3", "--grid",
                   tmp_path / "g.png")
    assert r.exit_code == 0 and (tmp_path / "g.png").is_file(), r.output
    r = toy.invoke("eval", *MODEL, "--reference", spec, "--reference-split", "train", "--text-features",
                   tmp_path / "prompts.pt", "--feature-extractor", "digit-classifier", "--metrics", "fid", "-n", "2")
    assert r.exit_code == 0 and "FID" in r.output, r.output
    bad = toy.invoke("train", *MODEL, "--data", tmp_path / "codes", "--batch-size", "2", "--workers", "0",
                     "--steps", "1", "--set", "model.overrides.bsc_layers=3", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "code cache" in bad.output, bad.output
