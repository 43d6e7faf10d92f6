"""Per-scale difference maps (sar diagnose --maps) on the VAR fixture model."""

from pathlib import Path

import torch
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.evaluate.difference_maps import difference_maps
from sar_core.tokens import token_argmax

FIX = Path(__file__).parent / "fixtures" / "var"


def _data(var, n=4):
    g = torch.Generator().manual_seed(0)
    size = var.image_size(var.default_schedule)[0]
    return [(torch.rand(n, 3, size, size, generator=g) * 2 - 1, torch.tensor([0, 3, 5, 7][:n]))]


def test_maps_match_a_direct_recomputation(var):
    data = _data(var)
    rep = difference_maps(var, data)
    sched = var.default_schedule
    assert rep["maps"][0] is None and rep["num_samples"] == 4
    assert [tuple(m.shape) for m in rep["maps"][1:]] == [tuple(hw) for hw in list(sched)[1:]]
    with var.inference(), torch.no_grad():
        codes = var.encode(data[0][0], sched)
        tf = var.forward(data[0][1], var.teacher_inputs(codes, sched), sched)
        preds = [token_argmax(tf[:, sched.slice(k)], None) for k in range(len(sched))]
        k = len(sched) - 2  # the last transition
        sf = var.forward(data[0][1], var.stagger_inputs(codes, preds, sched, [k]), sched)
        sl = sched.slice(k + 1)
        want = (sf[:, sl].argmax(-1) != tf[:, sl].argmax(-1)).float().mean(0)
    assert torch.allclose(rep["maps"][k + 1].flatten(), want)
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in rep["maps"][1:])


def test_diagnose_writes_difference_map_pngs(tmp_path):
    from PIL import Image

    maps = tmp_path / "maps"
    r = CliRunner().invoke(app, ["diagnose", "-f", "var", "--tokenizer", str(FIX / "vae_ch32v64z8.pth"),
                                 "--backbone", str(FIX / "var_tiny_d2w64.pth"), "--data", "digits",
                                 "--batches", "1", "--batch-size", "3", "--maps", str(maps), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in maps.iterdir())
    assert names == ["all_scales.png"] + [f"scale_{k:02d}.png" for k in range(1, 6)]
    with Image.open(maps / "all_scales.png") as im:
        assert im.format == "PNG" and im.size[0] > 500
