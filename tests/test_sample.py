"""``sar sample`` and the generation helpers: PNG grid / folder sizes, seeding, errors."""

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.evaluate.generation import balanced_labels, generate_images, parse_labels


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A small random VAR (16 px, schedule 1_2_4, 10 classes) saved in the upstream layout."""
    from sar_adapters.var.adapter import VARAdapter
    from sar_adapters.var.config import VARConfig

    torch.manual_seed(0)
    adapter = VARAdapter.from_config(VARConfig(
        vocab_size=32, Cvae=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, depth=1, embed_dim=32,
        num_heads=2, num_classes=10, patch_nums=(1, 2, 4)))
    with torch.no_grad():
        for p in list(adapter.tokenizer.parameters()) + list(adapter.backbone.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    d = tmp_path_factory.mktemp("model")
    adapter.save(d / "tok.pth", d / "bb.pth")
    return d / "tok.pth", d / "bb.pth"


def run(model_files, *args):
    tok, bb = model_files
    return CliRunner().invoke(app, ["sample", "-f", "var", "--tokenizer", str(tok), "--backbone", str(bb),
                                    "--device", "cpu", *args])


def grid_side(n_images: int, side: int, pad: int = 2) -> int:
    return n_images * side + (n_images + 1) * pad


def test_grid_of_labels_has_the_right_size(model_files, tmp_path):
    r = run(model_files, "--labels", "1,2,3", "--grid", str(tmp_path / "g.png"), "--nrow", "3")
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "g.png") as im:
        assert im.format == "PNG" and im.size == (grid_side(3, 16), grid_side(1, 16))


def test_per_class_grid_and_folder(model_files, tmp_path):
    r = run(model_files, "--per-class", "2", "--grid", str(tmp_path / "g.png"), "--folder", str(tmp_path / "f"))
    assert r.exit_code == 0, r.output
    with Image.open(tmp_path / "g.png") as im:  # one row per class, 2 columns
        assert im.size == (grid_side(2, 16), grid_side(10, 16))
    files = sorted((tmp_path / "f").glob("*.png"))
    assert len(files) == 20 and files[0].name == "000000_c0.png" and files[19].name == "000019_c9.png"
    with Image.open(files[5]) as im:
        assert im.size == (16, 16) and im.mode == "RGB"


def test_seed_reproduces_and_changes_samples(model_files):
    from sar_core.evaluate.generation import load_adapter

    adapter = load_adapter("var", *model_files, device="cpu")
    labels = balanced_labels(6, 10)
    a = generate_images(adapter, labels, seed=5, batch_size=4)
    b = generate_images(adapter, labels, seed=5, batch_size=4)
    c = generate_images(adapter, labels, seed=6, batch_size=4)
    assert a.shape == (6, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="0..9"):
        generate_images(adapter, torch.tensor([3, 10]))


def test_bad_requests_fail_clearly(model_files, tmp_path):
    r = run(model_files, "--labels", "1")
    assert r.exit_code == 2 and "--grid" in r.output
    r = run(model_files, "--labels", "1", "--per-class", "2", "--grid", str(tmp_path / "g.png"))
    assert r.exit_code == 2 and "exactly one" in r.output
    torch.save([torch.zeros(2, 4), torch.zeros(3, 4)], tmp_path / "t.pt")
    r = run(model_files, "--text-features", str(tmp_path / "t.pt"), "--grid", str(tmp_path / "g.png"))
    assert r.exit_code == 2 and "not text-conditioned" in r.output
    r = run(model_files, "--labels", "1,x", "--grid", str(tmp_path / "g.png"))
    assert r.exit_code == 2 and "integers" in r.output
    assert not (tmp_path / "g.png").exists()


def test_label_helpers():
    assert parse_labels("1, 2 3") == [1, 2, 3]
    assert balanced_labels(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_condition_payloads_go_through_adapter_condition(model_files):
    from sar_core.evaluate.generation import condition_batch, load_adapter

    adapter = load_adapter("var", *model_files, device="cpu")
    # stand-in for a text-conditioned family: its condition() maps a payload to class ids
    adapter.condition = lambda batch: batch.conditions["ids"].values[:, 0, 0].long()
    labels = torch.tensor([4, 7, 1])
    feats = [torch.full((n, 1), float(c)) for n, c in zip((1, 3, 2), labels.tolist())]
    via_payloads = generate_images(adapter, conditions={"ids": feats}, cfg=1.5, seed=9, batch_size=2)
    via_labels = generate_images(adapter, labels, cfg=1.5, seed=9, batch_size=2)
    assert torch.equal(via_payloads, via_labels)
    assert len(condition_batch({"ids": feats})) == 3
    with pytest.raises(ValueError, match="exactly one"):
        generate_images(adapter, labels, conditions={"ids": feats})


def readme_command(text: str, prog: str) -> list[str]:
    """The first ``prog ...`` command of a README code block (continuation lines joined)."""
    import shlex

    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(prog + " "))
    parts = []
    for ln in lines[start:]:
        parts.append(ln.strip().rstrip("\\"))
        if not ln.rstrip().endswith("\\"):
            break
    return shlex.split(" ".join(parts))


@pytest.mark.parametrize("folder", ["flexvar", "var", "infinity", "var-large", "flexvar-large", "infinity-large"])
def test_shipped_miniatures_sample_with_the_command_their_readme_gives(folder, tmp_path):
    """Each miniature's README sampling command (with its --override flags) works as written."""
    from sar_plugins.demo import MINIS

    args = readme_command((MINIS / folder / "README.md").read_text(), "sar sample")
    assert args[:3] == ["sar", "sample", "-f"] and args[3] == folder.removesuffix("-large")
    root = str(MINIS.parent.parent.parent)  # the paths in the README are relative to the repository
    args = [a.replace("plugins/", root + "/plugins/", 1) if a.startswith("plugins/") else a for a in args[1:]]
    args = [str(tmp_path / a) if a.endswith(".png") else a for a in args]
    args[args.index("--per-class") + 1] = "1"
    res = CliRunner().invoke(app, args + ["--device", "cpu"])
    assert res.exit_code == 0, res.output
    size = 24 if folder.endswith("-large") else 16  # the ladder's second rung samples at 24 px
    assert max(Image.open(tmp_path / "grid.png").size) >= 10 * size  # one image of each of 10 classes


def test_override_flag_reaches_the_adapter_and_rejects_bad_pairs(model_files):
    from sar_cli._shared import parse_overrides

    assert parse_overrides(["patch_nums=[1,2,4]", "tau=1.5", "name=abc"]) == {
        "patch_nums": [1, 2, 4], "tau": 1.5, "name": "abc"}
    assert parse_overrides(None) is None
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["patch_nums"])
    res = run(model_files, "--labels", "1", "--grid", "x.png", "--override", "patch_nums=[1,2]")
    assert res.exit_code == 2 and "patch_nums" in res.output  # the file holds 1+4+16 positions
    res = run(model_files, "--labels", "1", "--grid", "x.png", "--override", "oops")
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
