"""sar pretrain (tokenizer fit + TF pretraining) and sar demo, end to end at toy sizes."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.train.pretrain import flattened
from sar_plugins.demo import MINIS

TINY_MODEL = """
tokenizer: {codebook_size: 32, codebook_embed_dim: 8, ch: 32, ch_mult: [1, 1], z_channels: 32, num_res_blocks: 1}
backbone: {depth: 1, embed_dim: 32, num_heads: 2, num_classes: 10, pos_grid: 8, drop_path_rate: 0.0}
train_patch_nums: [1, 2, 4, 8]
"""


def test_flattened_detects_plateau_and_progress():
    improving = [{"val_loss_tf": 5.0 - 0.5 * i} for i in range(8)]
    plateau = [{"val_loss_tf": v} for v in (5.0, 4.0, 3.5, 3.4, 3.41, 3.405, 3.42, 3.43)]
    assert not flattened(improving)
    assert flattened(plateau)
    assert not flattened(plateau[:3])


def test_pretrain_cli_builds_a_loadable_model(tmp_path):
    cfg = tmp_path / "model.yaml"
    cfg.write_text(TINY_MODEL)
    out = tmp_path / "pre"
    res = CliRunner().invoke(app, ["pretrain", "-f", "flexvar", "--model-config", str(cfg), "--data", "digits",
                                   "--image-size", "16", "--tokenizer-steps", "4", "--steps", "6",
                                   "--eval-every", "3", "--batch-size", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "pretrain.json").read_text())
    assert [c["step"] for c in summary["val_curve"]] == [3, 6]
    assert summary["backbone"]["best_step"] in (3, 6)
    assert summary["command"].startswith("sar pretrain -f flexvar")
    from sar_core.evaluate.generation import generate_images, load_adapter

    adapter = load_adapter("flexvar", out / "tokenizer.pth", out / "backbone.pth",
                           overrides={"train_patch_nums": [1, 2, 4, 8], "image_size": 16})
    imgs = generate_images(adapter, torch.tensor([1, 7]), cfg=1.0, seed=0)
    assert imgs.shape == (2, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1


def test_pretrain_cli_reports_bad_model_config(tmp_path):
    res = CliRunner().invoke(app, ["pretrain", "-f", "flexvar", "--model-config", str(tmp_path / "nope.yaml"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "model config not found" in res.output


TINY_OTHERS = {
    "var": ("{vocab_size: 32, Cvae: 8, ch: 32, ch_mult: [1, 1], num_res_blocks: 1, using_sa: false, "
            "using_mid_sa: false, depth: 1, embed_dim: 32, num_heads: 2, num_classes: 10, patch_nums: [1, 2, 4, 8]}",
            {"patch_nums": [1, 2, 4, 8]}),
    "infinity": ("{tokenizer: {codebook_dim: 6, base_ch: 24, ch_mult: [1, 1], num_res_blocks: 1, patch_size: 2}, "
                 "backbone: {depth: 1, embed_dim: 32, num_heads: 2, block_chunks: 1, mlp_hidden: 64, text_channels: 16, "
                 "text_maxlen: 4}, schedule: [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]], stand_in_classes: 10}",
                 {"schedule": [[1, 1], [2, 2], [4, 4], [6, 6], [8, 8]], "stand_in_classes": 10}),
}


@pytest.mark.parametrize("family", sorted(TINY_OTHERS))
def test_pretrain_fits_every_shipped_family(tmp_path, family):
    """VAR and Infinity (its BSQ tokenizer too) pretrain from nothing, reload and sample."""
    text, overrides = TINY_OTHERS[family]
    cfg = tmp_path / "model.yaml"
    cfg.write_text(text)
    out = tmp_path / "pre"
    res = CliRunner().invoke(app, ["pretrain", "-f", family, "--model-config", str(cfg), "--data", "digits-aug",
                                   "--image-size", "16", "--tokenizer-steps", "3", "--steps", "2",
                                   "--eval-every", "2", "--batch-size", "8", "--lr-end", "1e-4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "pretrain.json").read_text())
    assert "--lr-end" in summary["command"] and summary["tokenizer"]["codes_used_last_scale"] >= 1
    from sar_core.evaluate.generation import generate_images, load_adapter

    adapter = load_adapter(family, out / "tokenizer.pth", out / "backbone.pth", overrides=overrides)
    imgs = generate_images(adapter, torch.tensor([1, 7]), cfg=1.5, seed=0)
    assert imgs.shape == (2, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1


SHIPPED = {"flexvar": "flexvar", "var": "var", "infinity": "infinity", "var-large": "var",  # folder: family
           "flexvar-large": "flexvar", "infinity-large": "infinity"}


@pytest.mark.parametrize("folder_name", sorted(SHIPPED))
def test_shipped_miniature_is_complete(folder_name):
    """Every shipped miniature: its files, the command that made it (from its own model.yaml),
    its best backbone kept, and a cool-down config that reads the pretraining's output."""
    family, folder = SHIPPED[folder_name], MINIS / folder_name
    summary = json.loads((folder / "pretrain.json").read_text())
    assert summary["command"].startswith(f"sar pretrain -f {family} ") and summary["family"] == family
    assert f"--model-config plugins/assets/minis/{folder_name}/model.yaml " in summary["command"]
    assert f"--out runs/minis/{folder_name} " in summary["command"] + " "
    cool = yaml.safe_load((folder / "cool-down.yaml").read_text())
    assert cool["model"]["backbone"] == f"runs/minis/{folder_name}/backbone.pth" and cool["model"]["family"] == family
    assert cool["out"] == f"runs/minis/{folder_name}-cool" and summary["cool_down"]["steps"] == cool["train"]["steps"]
    assert summary["backbone"]["best_val_loss_tf"] == min(c["val_loss_tf"] for c in summary["val_curve"])
    assert (folder / "tokenizer.pth").is_file() and (folder / "backbone.pth").is_file()
    assert (folder / "model.yaml").is_file() and (folder / "README.md").is_file()


def test_demo_quick_run_writes_report(tmp_path):
    """sar demo is the `demo` study preset: paired seeds, intervals and noise in its report."""
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "1", "--seeds", "0,1",
                                   "--samples-per-class", "2", "--batch-size", "8",
                                   "--set", "eval.noise_seeds=[5,6]", "--set", "eval.gap_batches=1",
                                   "--set", "eval.grid_per_class=1", "--set", "eval.maps=false",
                                   "--set", "eval.reference_split=val"])
    assert res.exit_code == 0, res.output
    for name in ("report.md", "report.html", "report.json", "plots/var_gap_and_losses.png",
                 "var/tf/seed0/grid.png", "var/sar/seed0/grid.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "report.json").read_text())
    assert results["study"]["name"] == "demo" and results["study"]["seeds"] == [0, 1]
    fam = results["families"]["var"]
    assert set(fam["arms"]) == {"tf", "sar"}
    for key in ("fid", "class_acc", "gap_mean", "val_loss_tf"):
        d = fam["differences"][key]["sar"]
        assert d["n"] == 2 and torch.isfinite(torch.tensor(d["mean"])), key
        assert d["undefined"] == "zero spread" if d["low"] is None else d["low"] <= d["mean"] <= d["high"], key
    assert fam["noise"]["fid"]["n"] == 2 and fam["control_flat"]["fid"] in (True, False)
    # the val-set metrics are judged against their standard error over the val images
    assert fam["noise"]["val_loss_tf"]["deterministic"] and fam["noise"]["val_loss_tf"]["sd"] > 0
    assert fam["control_flat"]["val_loss_tf"] in (True, False)
    # the SAR arm really ran a student-forced pass, the control arm did not
    assert all(h["loss_csf"] > 0 for h in fam["arms"]["sar"]["history"])
    assert all(h["loss_csf"] == 0 for h in fam["arms"]["tf"]["history"])
    md = (out / "report.md").read_text()
    assert "paired difference arm - tf (95% t-interval over training seeds" in md and "noise sd" in md
