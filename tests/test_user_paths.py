"""Issue 11, user paths: nothing silent. A missing --backbone, odd image modes, and the
``sar eval`` reference / memory / progress rules each fail clearly or do the right thing."""

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sar_cli.main import app


def tiny_var(num_classes: int = 10):
    from sar_adapters.var.adapter import VARAdapter
    from sar_adapters.var.config import VARConfig

    torch.manual_seed(0)
    adapter = VARAdapter.from_config(VARConfig(
        vocab_size=32, Cvae=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, depth=1, embed_dim=32,
        num_heads=2, num_classes=num_classes, patch_nums=(1, 2, 4)))
    with torch.no_grad():
        for p in list(adapter.tokenizer.parameters()) + list(adapter.backbone.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return adapter


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_var().save(d / "tok.pth", d / "bb.pth")
    return d / "tok.pth", d / "bb.pth"


# ------------------------------------------------------------------ item 1: --backbone is required
@pytest.mark.parametrize("command", [
    ["sample", "--labels", "1", "--grid", "{tmp}/g.png"],
    ["eval", "--reference", "digits", "--feature-extractor", "digit-classifier", "-n", "4"],
    ["diagnose", "--data", "digits", "--batches", "1"],
])
def test_model_commands_refuse_a_random_backbone_unless_asked(files, tmp_path, command, monkeypatch):
    tok, _ = files
    cmd = [c.format(tmp=tmp_path) for c in command]
    args = [cmd[0], "-f", "var", "--tokenizer", str(tok), "--device", "cpu", *cmd[1:]]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--backbone" in lines[0] and "--random-backbone" in lines[0]
    if cmd[0] == "sample":  # the explicit flag makes it run, and says so
        import sar_core.evaluate.generation as G

        calls = []  # a tokenizer alone implies a 306M-parameter VAR-d16: load the tiny one instead
        monkeypatch.setattr(G, "load_adapter", lambda *a, **k: calls.append(a) or tiny_var())
        r = CliRunner().invoke(app, args + ["--random-backbone"])
        assert r.exit_code == 0, r.output
        assert "freshly initialised" in r.output and (tmp_path / "g.png").is_file()
        assert calls and calls[0][2] is None  # no backbone file was passed on


def test_backbone_and_random_backbone_together_are_refused(files, tmp_path):
    tok, bb = files
    r = CliRunner().invoke(app, ["sample", "-f", "var", "--tokenizer", str(tok), "--backbone", str(bb),
                                 "--random-backbone", "--labels", "1", "--grid", str(tmp_path / "g.png")])
    assert r.exit_code == 2 and "not both" in r.output


# ------------------------------------------------------------------ item 3: every PIL mode
def _gradient(size: int = 24) -> np.ndarray:
    return np.tile(np.linspace(0, 1, size), (size, 1))


def _save_modes(root, size: int = 24):
    """One file per mode in class folder 'a'; returns {mode: path}."""
    g = _gradient(size)
    cls = root / "a"
    cls.mkdir(parents=True)
    rgb = np.stack([g, g[::-1], np.full_like(g, 0.5)], -1)
    imgs = {
        "I;16": Image.fromarray((g * 65535).round().astype(np.uint16)),
        "I": Image.fromarray((g * 65535).round().astype(np.int32)),
        "L": Image.fromarray((g * 255).round().astype(np.uint8)),
        "RGBA": Image.fromarray(np.concatenate([(rgb * 255).astype(np.uint8),
                                                np.zeros((size, size, 1), np.uint8)], -1), "RGBA"),
        "LA": Image.fromarray((g * 255).round().astype(np.uint8)).convert("LA"),
        "P": Image.fromarray((rgb * 255).astype(np.uint8)).convert("P"),
        "CMYK": Image.fromarray((rgb * 255).astype(np.uint8)).convert("CMYK"),
        "F": Image.fromarray(g.astype(np.float32)),
    }
    paths = {}
    for mode, img in imgs.items():
        ext = {"CMYK": ".jpg", "F": ".tiff", "I": ".tiff"}.get(mode, ".png")
        p = cls / f"{mode.replace(';', '_')}{ext}"
        img.save(p)
        paths[mode] = p
    return paths


def test_every_pil_mode_reads_as_correct_8bit_rgb(tmp_path):
    from sar_core.data.image_io import open_rgb8

    paths = _save_modes(tmp_path)
    want = (_gradient() * 255).round()
    for mode in ("I;16", "I", "L", "F", "LA"):
        img, notes = open_rgb8(paths[mode])
        assert img.mode == "RGB", mode
        arr = np.asarray(img).astype(float)
        assert np.abs(arr[..., 0] - want).max() <= 1, mode        # scaled, not saturated
        assert (arr[..., 0] == 255).mean() < 0.1, mode
    rgba, notes = open_rgb8(paths["RGBA"])
    assert (np.asarray(rgba) == 255).all() and any("white" in n for n in notes)  # fully transparent: white
    for mode in ("P", "CMYK"):
        img, _ = open_rgb8(paths[mode])
        assert img.mode == "RGB" and np.asarray(img).std() > 10, mode


def test_image_folder_16bit_is_not_white_and_notes_are_said_once(tmp_path, capfd):
    from sar_plugins.datasets import ImageFolderDataset

    g = _gradient(32)
    cls = tmp_path / "a"
    cls.mkdir()
    for i in range(3):
        Image.fromarray((g * 65535).round().astype(np.uint16)).save(cls / f"x{i}.png")
        Image.fromarray((g * 255).round().astype(np.uint8)).save(cls / f"y{i}.png")
    ds = ImageFolderDataset(tmp_path, split="train", image_size=16, augment=False)
    capfd.readouterr()
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    assert ((x + 1) / 2 > 0.99).float().mean() < 0.2          # 16-bit PNGs no longer saturate to white
    assert torch.allclose(x[0], x[3], atol=2 / 255)            # 16-bit and 8-bit copies agree
    err = capfd.readouterr().err
    assert err.count("grayscale") == 1 and err.count("I;16") == 1, err
    ImageFolderDataset(tmp_path, split="train", image_size=64, augment=False)[0]
    assert capfd.readouterr().err.count("upscaled") == 1


def test_unknown_mode_is_refused_with_a_message():
    from sar_core.data.image_io import to_rgb8

    class OddImage:  # a mode sar does not know how to scale
        mode = "XYZ;7"

    with pytest.raises(ValueError, match="PIL mode 'XYZ;7'"):
        to_rgb8(OddImage())


# ------------------------------------------------------------------ item 5: sar eval
def test_mixed_size_reference_folder_and_its_split(tmp_path):
    from sar_core.evaluate.metrics import evaluate_adapter, get_feature_extractor

    ref = tmp_path / "ref"
    (ref / "val" / "c").mkdir(parents=True)
    (ref / "train").mkdir()
    (ref / "train" / "broken.png").write_bytes(b"not a png")  # read only if the split were ignored
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 60), (16, 16), (90, 33), (20, 20), (64, 48)]):
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(ref / "val" / "c" / f"{i}.png")
    passes = []

    def progress(description, total):
        passes.append([description, total, 0])
        return lambda n: passes[-1].__setitem__(2, passes[-1][2] + n)

    report = evaluate_adapter(tiny_var(), num_samples=6, extractor=get_feature_extractor("digit-classifier"),
                              reference=str(ref), reference_split="val", metrics=["fid", "kid"], batch_size=4,
                              progress=progress)
    assert report["num_reference"] == 5 and report["reference_split"] == "val"
    assert np.isfinite(report["fid"])
    names = [p[0] for p in passes]
    assert names == ["sampling", "features of the samples", "features of the reference", "class accuracy"]
    assert all(done == total for _, total, done in passes)     # every pass reported to the end
    assert any("grayscale" in n for n in report["notes"])        # digit features on colour samples: warned


def test_reference_is_checked_before_sampling(tmp_path, monkeypatch):
    from sar_core.evaluate.metrics import evaluate_adapter, get_feature_extractor

    adapter = tiny_var()
    monkeypatch.setattr(adapter, "generate", lambda *a, **k: pytest.fail("sampled before checking the reference"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    fe = get_feature_extractor("digit-classifier")
    with pytest.raises(ValueError, match="no images"):
        evaluate_adapter(adapter, num_samples=4, extractor=fe, reference=str(tmp_path / "empty"),
                         reference_split=".")
    with pytest.raises(ValueError, match="cannot read image"):
        evaluate_adapter(adapter, num_samples=4, extractor=fe, reference=str(tmp_path / "bad"), reference_split=".")
    with pytest.raises(ValueError, match="no 'val' split"):  # the default split, which neither holds
        evaluate_adapter(adapter, num_samples=4, extractor=fe, reference=str(tmp_path / "bad"))


def test_samples_are_streamed_as_uint8_equal_to_the_float_path(tmp_path):
    from sar_core.evaluate.inputs import sample_uint8
    from sar_core.evaluate.generation import generate_images, to_uint8

    adapter = tiny_var()
    labels = torch.arange(7) % 3
    u8 = sample_uint8(adapter, 7, labels=labels, names=labels, schedule=adapter.default_schedule, batch_size=3,
                      seed=5, cfg=1.5,
                      samples_folder=tmp_path / "s")
    assert u8.dtype == torch.uint8 and u8.shape == (7, 3, 16, 16)
    ref = to_uint8(generate_images(adapter, labels, seed=5, cfg=1.5, batch_size=3))
    assert torch.equal(u8, ref)
    assert len(list((tmp_path / "s").glob("*.png"))) == 7


def test_eval_defaults_to_inception(files, tmp_path, monkeypatch):
    tok, bb = files
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    r = CliRunner().invoke(app, ["eval", "-f", "var", "--tokenizer", str(tok), "--backbone", str(bb),
                                 "--reference", "digits", "--device", "cpu"])
    assert r.exit_code == 2 and "'inception' feature extractor needs local weights" in r.output


def test_training_without_a_backbone_says_it_is_pretraining(tmp_path):
    import toy_adapter as toy
    from sar_core.train.config import build_config
    from sar_core.train.trainer import Trainer

    lines = []
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images", "workers": 0},
                        "train": {"batch_size": 4, "loggers": []}, "out": str(tmp_path / "run")})
    Trainer(cfg, registry=toy.make_registry(), log=lines.append)
    assert any("freshly initialised backbone (pretraining)" in ln for ln in lines), lines
