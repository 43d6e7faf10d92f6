"""Issue 11 item 4: `sar tokenize` says which schedule and size it uses, refuses silent
upscaling, sends every --schedule through the adapter's size check, and a cache made
without a backbone trains when it matches."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import toy_adapter as toy
from test_user_paths import tiny_var

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tiny_var().save(d / "tok.pth", d / "bb.pth")
    rng = np.random.default_rng(0)
    for c in range(3):
        (d / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / "imgs" / f"c{c}" / f"{i}.png")
    return d


def _tokenize(d, out, *extra):
    """``sar tokenize`` with a tokenizer alone. It used to build a fresh 306M-parameter
    VAR-d16 backbone that tokenize never uses; now none is built (adapter.load_tokenizer),
    and building one fails here."""
    from sar_adapters.var.backbone import VAR

    def refuse(self, *args, **kwargs):
        raise AssertionError("sar tokenize built a backbone")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VAR, "__init__", refuse)
        return toy.invoke("tokenize", "-f", "var", "--tokenizer", d / "tok.pth", "--data", d / "imgs",
                          "--out", out, "--device", "cpu", *extra)


def test_cache_without_backbone_says_its_schedule_and_trains_when_it_matches(files, tmp_path):
    r = _tokenize(files, tmp_path / "cache", "--schedule", "1_2_4")
    assert r.exit_code == 0, r.output
    assert "schedule 1_2_4 (--schedule); images 16x16" in " ".join(r.output.split())
    r = toy.invoke("train", "-f", "var", "--tokenizer", files / "tok.pth", "--backbone", files / "bb.pth",
                   "--data", tmp_path / "cache", "--steps", "1", "--batch-size", "2", "--workers", "0",
                   "--rollout", "none", "--loggers", "jsonl", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output


def test_default_schedule_that_would_upscale_is_refused(files, tmp_path):
    r = _tokenize(files, tmp_path / "cache")
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "the family's default for this tokenizer alone" in text and "images 64x64" in text
    assert "as small as 16 px a side would be upscaled to 64x64" in text and "--allow-upscale" in text
    assert not (tmp_path / "cache").exists()


def test_schedule_names_go_through_the_adapter_size_check(tmp_path):
    from sar_adapters.flexvar.adapter import FlexVARAdapter
    from sar_cli.tokenize_cmd import cache_schedule
    from sar_core.plugins import get_registry
    from sar_core.train.trainer import build_schedule_sampler

    small = FlexVARAdapter.load(FIX / "flexvar" / "FlexVAE_tiny.pth", FIX / "flexvar" / "FlexVARd2-tiny.pth",
                                overrides={"image_size": 32})  # an 8-token latent: too small for side 16
    for spec, message in (("flexvar-random", "end at side 16"), ("1_2_4_16", "above the 8-token latent")):
        with pytest.raises(ValueError, match=message):
            small.check_schedule_sampler(build_schedule_sampler(small, spec, 0, get_registry()))
        with pytest.raises(ValueError, match=message):  # what sar tokenize does
            cache_schedule(small, spec)
    big = FlexVARAdapter.load(FIX / "flexvar" / "FlexVAE_tiny.pth", FIX / "flexvar" / "FlexVARd2-tiny.pth",
                              overrides={"image_size": 64})  # a 16-token latent: random schedules fit
    big.check_schedule_sampler(build_schedule_sampler(big, "flexvar-random", 0, get_registry()))
    with pytest.raises(ValueError, match="a code cache holds one schedule"):
        cache_schedule(big, "flexvar-random")
    assert str(cache_schedule(small, "1_2_4")) == "1_2_4"


def test_train_sends_a_schedule_name_through_the_adapter_size_check(tmp_path):
    r = toy.invoke("train", "-f", "flexvar", "--tokenizer", FIX / "flexvar" / "FlexVAE_tiny.pth",
                   "--backbone", FIX / "flexvar" / "FlexVARd2-tiny.pth", "--data", "digits", "--image-size", "32",
                   "--schedule", "flexvar-random", "--steps", "1", "--batch-size", "2", "--workers", "0",
                   "--loggers", "jsonl", "--out", tmp_path / "run")
    assert r.exit_code == 2 and "end at side 16" in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("family,tok", [("var", FIX / "var" / "vae_ch32v64z8.pth"),
                                        ("flexvar", FIX / "flexvar" / "FlexVAE_tiny.pth"),
                                        ("infinity", FIX / "infinity" / "infinity_vae_d16_tiny.pth")])
def test_tokenizer_only_loads_build_no_backbone(family, tok):
    from sar_core.checkpoint_io import NoBackbone
    from sar_core.evaluate.generation import load_adapter

    ad = load_adapter(family, tok, device="cpu", tokenizer_only=True)
    assert isinstance(ad.backbone, NoBackbone) and ad.device.type == "cpu"
    assert not list(ad.backbone.parameters()) and not ad.backbone.training
    with pytest.raises(RuntimeError, match="tokenizer only"):
        ad.backbone(None, None, None)
    with pytest.raises(ValueError, match="no backbone file"):
        load_adapter(family, tok, FIX / "var" / "var_tiny_d2w64.pth", tokenizer_only=True)
