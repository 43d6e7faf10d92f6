"""The digits dataset: deterministic disjoint stratified split, rendering, registration."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sar_plugins.digits import DigitsDataset, _load_arrays, digits, render, split_indices


def test_split_is_deterministic_disjoint_and_complete():
    a, b = DigitsDataset("train"), DigitsDataset("train")
    v = DigitsDataset("val")
    assert np.array_equal(a.indices, b.indices)
    assert np.array_equal(v.indices, DigitsDataset("val").indices)
    assert not set(a.indices) & set(v.indices)
    assert sorted(set(a.indices) | set(v.indices)) == list(range(1797))
    assert len(v) == 179 and len(a) == 1618


def test_split_is_stratified_about_ten_percent_per_class():
    _, labels = _load_arrays()
    val = split_indices(labels, "val")
    for c in range(10):
        members = int((labels == c).sum())
        assert int((labels[val] == c).sum()) == round(0.1 * members)


def test_split_changes_with_seed_and_rejects_unknown_split():
    _, labels = _load_arrays()
    assert not np.array_equal(split_indices(labels, "val", seed=1), split_indices(labels, "val", seed=2))
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("test")


@pytest.mark.parametrize("size", [4, 8, 16, 33])
def test_items_shape_range_and_grey(size):
    ds = digits(split="val", image_size=size)
    image, label = ds[3]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    assert image.min() >= -1 and image.max() <= 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_native_size_is_the_raw_grid_white_on_black():
    ds = digits(split="train", image_size=8)
    images, _ = _load_arrays()
    image, label = ds[0]
    grid = torch.from_numpy(images[ds.indices[0]])
    assert torch.allclose(image[0], grid * 2 - 1)
    # digits are drawn bright on a dark background: most pixels are background (-1)
    assert (image[0] == -1).float().mean() > 0.3
    assert int(label) == int(_load_arrays()[1][ds.indices[0]])


def test_upsampling_keeps_the_digit():
    small, big = digits("val", image_size=8), digits("val", image_size=32)
    down = torch.nn.functional.avg_pool2d(big[5][0][None], 4)[0]
    assert (down - small[5][0]).abs().mean() < 0.15


def test_render_batches():
    grids = torch.rand(2, 5, 8, 8)
    out = render(grids, 16)
    assert out.shape == (2, 5, 3, 16, 16)
    assert torch.allclose(out[1, 2], render(grids[1, 2], 16))


def test_hflip_off_by_default_and_random_when_on():
    plain = digits("val", 16)
    assert all(torch.equal(plain[7][0], plain[7][0]) for _ in range(5))
    flipped = digits("val", 16, hflip=True)
    torch.manual_seed(0)
    draws = [flipped[7][0] for _ in range(40)]
    n_same = sum(torch.equal(d, plain[7][0]) for d in draws)
    n_flip = sum(torch.equal(d, plain[7][0].flip(-1)) for d in draws)
    assert n_same + n_flip == 40 and 5 < n_flip < 35


def test_registered_through_entry_point():
    from sar_core.plugins import build_registry

    reg = build_registry()
    ds = reg.get("dataset", "digits")(split="val", image_size=16, unused_option=1)
    assert len(ds) == 179 and ds[0][0].shape == (3, 16, 16)


def test_digits_aug_is_a_fixed_label_preserving_enlargement():
    from sar_core.evaluate.metrics import get_feature_extractor
    from sar_plugins.digits import AugmentedDigits, digits_aug

    aug, raw = digits_aug("val", 16), DigitsDataset("val", 16)
    assert len(aug) == 8 * len(raw) and len(digits_aug("train", 16)) == 64 * 1618
    n = len(raw)
    x, y = aug[n + 3]
    assert int(y) == int(raw[3][1])                        # copy 1 of image 3 keeps its label
    assert torch.equal(x, AugmentedDigits("val", 16)[n + 3][0])  # the same image in every process
    assert not torch.equal(x, aug[3][0]) and not torch.equal(x, raw[3][0])  # copies differ
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(IndexError):
        aug[len(aug)]
    # label-preserving: the digit classifier (trained on raw digits) still reads the warped ones
    net = get_feature_extractor("digit-classifier").classifier("cpu")
    idx = range(n, n + 200)
    images = torch.stack([aug[i][0] for i in idx]).add(1).div(2).mul(255).round().to(torch.uint8)
    labels = torch.stack([aug[i][1] for i in idx])
    acc = (net(images).argmax(-1) == labels).float().mean()
    assert acc > 0.85, acc


def test_digits_aug_is_registered():
    from sar_core.data.datasets import open_dataset

    assert len(open_dataset("digits-aug", "val", 16)) == 8 * 179


def test_digits_text_captions_are_the_infinity_miniatures_prompts():
    """digits-text items carry the caption's features (and the label); with the defaults they
    equal the Infinity adapter's stand-in prompts, so the miniature's text path reads them."""
    from sar_adapters.infinity.adapter import InfinityAdapter
    from sar_core.data.datasets import open_dataset
    from sar_plugins.digits import caption_features

    ds = open_dataset("digits-text", split="val", image_size=16, deterministic=True)
    image, target = ds[7]
    assert image.shape == (3, 16, 16) and set(target) == {"text_features", "label"}
    assert ds.caption(7) == f"digit {target['label']}"
    assert torch.equal(target["text_features"], caption_features()[target["label"]])
    stand_in = InfinityAdapter.stand_in_features(SimpleNamespace(config=SimpleNamespace(
        stand_in_classes=10, stand_in_tokens=2, backbone=SimpleNamespace(text_channels=32))))
    assert torch.equal(caption_features(tokens=2, text_channels=32), stand_in)
    assert not torch.equal(caption_features(seed=1), stand_in)
