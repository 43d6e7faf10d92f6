"""Metrics through torch-fidelity with the digit-classifier extractor, fail-fast Inception,
ADM-style reference statistics, and the whole ``evaluate_adapter`` pipeline."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sar_core.evaluate.metrics import (
    MissingWeightsError, class_accuracy, compute_metrics, extract_features, fid_statistics,
    get_feature_extractor, load_statistics, save_statistics, write_samples_npz,
)
from sar_plugins.digits import digits



@pytest.fixture(scope="module")
def fe():
    return get_feature_extractor("digit-classifier")


@pytest.fixture(scope="module")
def sets():
    """(val: 179 digits, reference: 400 train digits), 16 px."""
    return digits("val", 16), torch.utils.data.Subset(digits("train", 16), range(400))


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_large(fe, sets):
    val, train = sets
    same = compute_metrics(val, val, extractor=fe, metrics=["fid", "prc"])
    assert abs(same["fid"]) < 1e-6
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    real = compute_metrics(val, train, extractor=fe, metrics=["fid", "kid"], kid_subsets=10)
    noise = torch.rand(len(val), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fake = compute_metrics(noise, train, extractor=fe, metrics=["fid", "prc", "kid"], kid_subsets=10)
    assert fake["fid"] > 10 and fake["fid"] > 50 * real["fid"]
    assert fake["precision"] < 0.05
    assert fake["kid_mean"] > 100 * abs(real["kid_mean"])


def test_inception_score_is_high_for_digits_low_for_noise(fe, sets):
    val, _ = sets
    real = compute_metrics(val, extractor=fe, metrics=["isc"])["isc_mean"]
    flat = compute_metrics(torch.full((50, 3, 16, 16), 0.5), extractor=fe, metrics=["isc"])["isc_mean"]
    assert real > 5 and abs(flat - 1.0) < 1e-6


def test_same_fid_as_torch_fidelity_calculate_metrics(fe, sets):
    import torch_fidelity

    from sar_core.evaluate.images import DatasetImages

    val, train = sets
    ours = compute_metrics(val, train, extractor=fe, metrics=["fid"])["fid"]
    theirs = torch_fidelity.calculate_metrics(
        input1=DatasetImages(val), input2=DatasetImages(train), fid=True, cuda=False, cache=False,
        verbose=False, save_cpu_ram=True, feature_extractor="sar-digit-classifier",
        feature_extractor_weights_path=fe.weights_path)["frechet_inception_distance"]
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_folder_and_tensor_inputs_give_the_same_features(fe, tmp_path):
    from sar_core.evaluate.generation import save_folder

    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    save_folder(images, tmp_path)
    a = extract_features(images, fe, ["pool"])["pool"]
    b = extract_features(str(tmp_path), fe, ["pool"])["pool"]
    assert torch.allclose(a, b)


def test_fid_from_adm_style_reference_statistics(fe, sets, tmp_path):
    val, train = sets
    ref = extract_features(train, fe, ["pool"])["pool"]
    path = save_statistics(fid_statistics(ref), tmp_path / "ref.npz")
    stats = load_statistics(path)
    direct = compute_metrics(val, train, extractor=fe, metrics=["fid"])["fid"]
    from_stats = compute_metrics(val, extractor=fe, metrics=["fid"], reference_stats=stats)["fid"]
    assert from_stats == pytest.approx(direct, rel=1e-9)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="sigma"):
        load_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "wrong_dim.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="feature sizes"):
        compute_metrics(val, extractor=fe, metrics=["fid"], reference_stats=load_statistics(tmp_path / "wrong_dim.npz"))


def test_pair_metrics_need_a_reference(fe, sets):
    with pytest.raises(ValueError, match="reference"):
        compute_metrics(sets[0], extractor=fe, metrics=["kid"])
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(sets[0], sets[0], extractor=fe, metrics=["fd"])


def test_class_accuracy_of_the_shipped_classifier(fe):
    val = digits("val", 48)
    assert class_accuracy(val, val.labels, fe) >= 0.95
    wrong = (val.labels + 1) % 10
    assert class_accuracy(val, wrong, fe) <= 0.05


def test_shipped_weights_are_small_and_safe_to_load():
    from sar_core.checkpoint_io import load_file
    from sar_plugins.digit_classifier import ASSET

    assert ASSET.stat().st_size < 1_000_000
    blob = load_file(ASSET)  # weights_only=True
    assert blob["meta"]["seed"] == 0 and blob["meta"]["val_acc_16px"] >= 0.95


def test_classifier_training_learns_quickly():
    from sar_plugins.digit_classifier import train_classifier

    _, stats = train_classifier(epochs=3, seed=1, log=None)
    assert stats["val_acc_16px"] > 0.5


def test_missing_inception_weights_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    start = time.monotonic()
    with pytest.raises(MissingWeightsError, match="--feature-weights"):
        get_feature_extractor("inception")
    with pytest.raises(MissingWeightsError, match="not found"):
        get_feature_extractor("inception", tmp_path / "nope.pth")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(MissingWeightsError, match="fc.weight"):
        get_feature_extractor("inception", tmp_path / "other.pth")
    assert time.monotonic() - start < 5


def test_eval_cli_checks_inception_before_loading_the_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from sar_cli.main import app

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    r = CliRunner().invoke(app, ["eval", "-f", "var", "--tokenizer", "missing.pth", "--reference", "digits",
                                 "--feature-extractor", "inception"])
    assert r.exit_code == 2
    assert "feature-weights" in r.output.replace("\n", "") and "missing.pth" not in r.output


def test_samples_npz_in_adm_layout(tmp_path):
    images = torch.rand(3, 3, 8, 8)
    path = write_samples_npz(images, tmp_path / "s.npz")
    arr = np.load(path)["arr_0"]
    assert arr.shape == (3, 8, 8, 3) and arr.dtype == np.uint8
    assert arr[1, 2, 3, 0] == int(torch.floor(images[1, 0, 2, 3] * 255 + 0.5))


def tiny_var():
    """A small random VAR (16 px, schedule 1_2_4) with non-degenerate weights."""
    from sar_adapters.var.adapter import VARAdapter
    from sar_adapters.var.config import VARConfig

    torch.manual_seed(0)
    adapter = VARAdapter.from_config(VARConfig(
        vocab_size=32, Cvae=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, depth=1, embed_dim=32,
        num_heads=2, num_classes=10, patch_nums=(1, 2, 4)))
    with torch.no_grad():
        for p in list(adapter.tokenizer.parameters()) + list(adapter.backbone.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    return adapter


def test_evaluate_adapter_end_to_end(fe, tmp_path):
    from sar_core.evaluate.metrics import evaluate_adapter

    adapter = tiny_var()
    report = evaluate_adapter(adapter, num_samples=20, extractor=fe, reference="digits", cfg=1.5, seed=3,
                              batch_size=10, samples_folder=tmp_path / "s")
    assert report["num_generated"] == 20 and report["num_reference"] == 179
    assert report["image_size"] == [16, 16] and report["schedule"] == [1, 2, 4]
    for key in ("fid", "isc_mean", "kid_mean", "precision", "recall", "class_accuracy"):
        assert np.isfinite(report[key])
    assert 0 <= report["class_accuracy"] <= 1
    files = sorted(p.name for p in (tmp_path / "s").glob("*.png"))
    assert len(files) == 20 and files[0] == "000000_c0.png" and files[11] == "000011_c1.png"
    # the random-weight model makes noise: far from real digits
    assert report["fid"] > 5


def test_eval_cli_report_and_reusable_reference_statistics(tmp_path):
    import json

    from typer.testing import CliRunner

    from sar_cli.main import app

    tiny_var().save(tmp_path / "tok.pth", tmp_path / "bb.pth")
    model = ["eval", "-f", "var", "--tokenizer", str(tmp_path / "tok.pth"), "--backbone", str(tmp_path / "bb.pth"),
             "--device", "cpu", "-n", "12", "--seed", "4", "--feature-extractor", "digit-classifier"]
    r = CliRunner().invoke(app, model + ["--reference", "digits", "--metrics", "fid,isc",
                                         "--save-reference-stats", str(tmp_path / "ref.npz"),
                                         "--out", str(tmp_path / "a.json")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a.json").read_text())
    assert a["num_generated"] == 12 and a["feature_extractor"] == "digit-classifier" and "kid_mean" not in a
    r = CliRunner().invoke(app, model + ["--reference-stats", str(tmp_path / "ref.npz"),
                                         "--out", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["fid"] == pytest.approx(a["fid"], rel=1e-9) and b["class_accuracy"] == a["class_accuracy"]
    assert "kid_mean" not in b and b["notes"]


def test_inception_wiring_with_a_local_weights_file(tmp_path, monkeypatch):
    """Random Inception weights in torch-fidelity's layout, read from a local path only."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_download)
    with monkeypatch.context() as m:  # build a random state dict without any file
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        sd = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(sd, tmp_path / "inception.pth")
    spec = get_feature_extractor("inception", tmp_path / "inception.pth")
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    feats = extract_features(images, spec, ["2048", "logits_unbiased"])
    assert feats["2048"].shape == (3, 2048) and feats["logits_unbiased"].shape == (3, 1008)
    assert torch.isfinite(feats["2048"]).all() and feats["2048"].std() > 0


def test_precision_recall_from_cached_reference_radii_equals_torch_fidelity(fe, sets):
    """A study caches the reference's k-NN radii; the numbers must not change."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    from sar_core.evaluate.metrics import knn_radii, precision_recall, radii_key, reference_features_for

    g = torch.Generator().manual_seed(3)
    gen, real = torch.randn(300, 16, generator=g), torch.randn(900, 16, generator=g) * 1.2 + 0.1
    ours = precision_recall(gen, real, 3, knn_radii(real, 3))
    theirs = prc_features_to_metric(gen, real, prc_neighborhood=3, verbose=False)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    assert ours == theirs
    # through compute_metrics: a reference-features dict carrying the radii gives the same numbers
    val, train = sets
    feats = reference_features_for(train, fe, ["fid", "prc"])
    layer = next(k for k in feats if "@prc_radii_k3" in k)
    assert feats[layer].shape == (len(train),)
    cached = compute_metrics(val, extractor=fe, metrics=["fid", "prc"], reference_features=feats)
    plain = compute_metrics(val, train, extractor=fe, metrics=["fid", "prc"])
    assert cached == plain
    zero = {**feats, layer: torch.zeros_like(feats[layer])}  # the radii are really read
    assert compute_metrics(val, extractor=fe, metrics=["prc"], reference_features=zero)["precision"] < 0.5
    with pytest.raises(ValueError, match="reference radii"):
        precision_recall(gen, real, 3, knn_radii(real[:10], 3))
    assert radii_key("x", 3) == "x@prc_radii_k3"


def test_colour_check_looks_at_many_pixels_and_names_which_set_is_colour():
    """Grayscale digits with one coloured pixel are not 'in colour' (one pixel used to decide);
    colour samples against a grayscale reference name the samples, and the other way round."""
    from sar_core.evaluate.images import DatasetImages, UInt8Images
    from sar_core.evaluate.inputs import colour_fraction, colour_note, looks_rgb

    gray = DatasetImages(digits("val", image_size=16))
    u8 = torch.stack([gray[i] for i in range(64)])
    assert colour_fraction(gray) == 0.0 and not looks_rgb(u8)
    speck = u8.clone()
    speck[3, 0, 5, 5] = 255
    speck[3, 1:, 5, 5] = 0                                     # one red pixel in 64 x 256
    assert 0 < colour_fraction(speck) < 0.001 and not looks_rgb(speck)
    assert colour_note("digit-classifier", speck, gray) is None
    colour = u8.clone()
    colour[:, 0] = 255 - colour[:, 0]                           # every pixel's red channel differs
    assert looks_rgb(colour)
    note = colour_note("digit-classifier", colour, gray)
    assert "the samples are in colour" in note and "reference" not in note
    note = colour_note("digit-classifier", u8, UInt8Images(colour))
    assert "the reference images are in colour" in note and "samples" not in note
