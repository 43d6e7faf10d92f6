"""VAR checkpoints: upstream layouts, rebuilt buffers, clear errors, bit-exact save -> load."""

from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from sar_adapters.var import VARAdapter
from sar_core.adapter import CheckpointError

FIX = Path(__file__).parent / "fixtures" / "var"
TOK, BB = FIX / "vae_ch32v64z8.pth", FIX / "var_tiny_d2w64.pth"
FLEX = Path(__file__).parent / "fixtures" / "flexvar"


@pytest.fixture(scope="module")
def sds():
    return torch.load(TOK, weights_only=True), torch.load(BB, weights_only=True)


@pytest.fixture(scope="module")
def adapter():
    return VARAdapter.load(TOK, BB)


def _logits(ad, seed=0):
    sched = ad.default_schedule
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, sched.total_tokens - sched.first_len, ad.config.Cvae, generator=g)
    ad.backbone.cond_drop_rate = 0.0
    ad.backbone.eval()
    with torch.no_grad():
        return ad.backbone(torch.tensor([1, 2]), x, sched)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_nested_training_layout_with_prefixes(tmp_path, sds, adapter):
    tok, bb = sds
    nested = {"epoch": 7, "iter": 123,
              "trainer": {"var_wo_ddp": OrderedDict(("module." + k, v) for k, v in bb.items()),
                          "vae_local": tok, "config": {"prog_it": 0}}}
    torch.save(nested, tmp_path / "ar-ckpt-last.pth")
    ad = VARAdapter.load(TOK, tmp_path / "ar-ckpt-last.pth")
    assert ad.layout == "trainer-weights" and ad.config == adapter.config
    _same_state(ad.backbone, adapter.backbone)
    # the tokenizer may come from the same training checkpoint
    ad2 = VARAdapter.load(tmp_path / "ar-ckpt-last.pth", tmp_path / "ar-ckpt-last.pth")
    _same_state(ad2.tokenizer, adapter.tokenizer)
    torch.save({"_orig_mod." + k: v for k, v in bb.items()}, tmp_path / "compiled.pth")
    torch.testing.assert_close(_logits(VARAdapter.load(TOK, tmp_path / "compiled.pth")), _logits(adapter), rtol=0, atol=0)


def test_stale_or_missing_buffers_are_rebuilt(tmp_path, sds, adapter):
    tok, bb = sds
    bb = dict(bb)
    bb["attn_bias_for_masking"] = torch.zeros(1, 1, 7, 7)
    bb["lvl_1L"] = torch.zeros(1, 7, dtype=torch.long)
    for k in [k for k in bb if k.endswith("zero_k_bias")]:
        del bb[k]
    tok = dict(tok)
    tok["quantize.ema_vocab_hit_SV"] = torch.ones(10, tok["quantize.embedding.weight"].shape[0])
    torch.save(bb, tmp_path / "bb.pth")
    torch.save(tok, tmp_path / "tok.pth")
    ad = VARAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
    assert ad.config == adapter.config
    _same_state(ad.backbone, adapter.backbone)  # rebuilt buffers equal the released ones
    torch.testing.assert_close(_logits(ad), _logits(adapter), rtol=0, atol=0)
    ad.save(tmp_path / "tok2.pth", None)
    assert torch.equal(torch.load(tmp_path / "tok2.pth")["quantize.ema_vocab_hit_SV"], tok["quantize.ema_vocab_hit_SV"])


@pytest.mark.parametrize("layout", ["plain", "trainer-weights", "nested"])   # nested: the old name
def test_save_load_round_trip_bit_exact(tmp_path, adapter, sds, layout):
    tok, bb = sds
    with torch.no_grad():  # make it differ from the files so the round trip proves something
        adapter.backbone.head.bias.add_(0.125)
    try:
        adapter.save(tmp_path / "tok.pth", tmp_path / "bb.pth", layout=layout)
        raw = torch.load(tmp_path / "bb.pth", weights_only=True)
        if layout != "plain":   # what upstream evaluation / inference reads; train.py could not resume it
            assert "var_opt" not in raw["trainer"] and "args" not in raw
        sd = raw["trainer"]["var_wo_ddp"] if layout != "plain" else raw
        # every key and buffer upstream's strict load expects, with upstream shapes
        assert list(sd) == list(bb) and all(sd[k].shape == bb[k].shape and sd[k].dtype == bb[k].dtype for k in bb)
        saved_tok = torch.load(tmp_path / "tok.pth", weights_only=True)
        assert set(saved_tok) == set(tok) and all(torch.equal(saved_tok[k], tok[k]) for k in tok)
        back = VARAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
        assert back.layout == {"nested": "trainer-weights"}.get(layout, layout) and back.config == adapter.config
        _same_state(back.backbone, adapter.backbone)
        _same_state(back.tokenizer, adapter.tokenizer)
        assert torch.equal(back.backbone.head.bias, bb["head.bias"] + 0.125)
    finally:
        with torch.no_grad():
            adapter.backbone.head.bias.sub_(0.125)


def test_saved_files_load_strictly_into_fresh_modules(tmp_path, adapter):
    """What upstream does: build the modules, then load_state_dict(strict=True)."""
    adapter.save(tmp_path / "tok.pth", tmp_path / "bb.pth")
    fresh = VARAdapter.from_config(adapter.config)
    fresh.backbone.load_state_dict(torch.load(tmp_path / "bb.pth", weights_only=True), strict=True)
    fresh.tokenizer.load_state_dict(torch.load(tmp_path / "tok.pth", weights_only=True), strict=True)
    _same_state(fresh.backbone, adapter.backbone)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        VARAdapter.load(TOK, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not found"):
        VARAdapter.load(tmp_path / "nope.pth", BB)


def test_corrupted_file(tmp_path):
    data = BB.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted|cannot read"):
        VARAdapter.load(TOK, tmp_path / "trunc.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        VARAdapter.load(tmp_path / "junk.pth", BB)


def test_flexvar_files_are_named_as_flexvar():
    with pytest.raises(CheckpointError, match="(?i)flexvar") as e:
        VARAdapter.load(TOK, FLEX / "FlexVARd2-tiny.pth")
    assert "pos_1LC" in str(e.value)
    with pytest.raises(CheckpointError, match="(?i)flexvar"):
        VARAdapter.load(FLEX / "FlexVAE_tiny.pth", BB)


def test_swapped_paths():
    with pytest.raises(CheckpointError, match="swap"):
        VARAdapter.load(BB, TOK)


def test_key_mismatches_reported_together(tmp_path, sds):
    _, bb = sds
    bad = dict(bb)
    del bad["blocks.1.ffn.fc2.bias"]
    bad["blocks.0.attn.extra_thing"] = torch.zeros(3)
    bad["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        VARAdapter.load(TOK, tmp_path / "bad.pth")
    msg = str(e.value)
    for part in ("blocks.1.ffn.fc2.bias", "blocks.0.attn.extra_thing", "blocks.0.attn.proj.weight",
                 "missing keys", "unexpected keys", "shape mismatches", "depth 2", "width 64"):
        assert part in msg, part


def test_tokenizer_mismatch_names_expected_size(tmp_path, sds):
    tok, _ = sds
    bad = dict(tok)
    bad["decoder.conv_out.weight"] = torch.zeros(3, 16, 3, 3)
    torch.save(bad, tmp_path / "tok.pth")
    with pytest.raises(CheckpointError, match="decoder.conv_out.weight") as e:
        VARAdapter.load(tmp_path / "tok.pth", BB)
    assert "vocab 64" in str(e.value)


def test_tokenizer_only_gives_fresh_backbone(tmp_path):
    ad = VARAdapter.load(TOK, None, overrides={"depth": 1, "embed_dim": 64, "num_heads": 1, "num_classes": 3,
                                                "patch_nums": (1, 2, 4, 8)})
    assert ad.config.vocab_size == 64 and ad.backbone.head.weight.shape == (64, 64)
    assert len(ad.backbone.blocks) == 1 and ad.default_schedule.sides == (1, 2, 4, 8)
