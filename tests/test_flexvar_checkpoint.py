"""FlexVAR checkpoint layouts, errors, save/load round trips, and plugin registration."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sar_adapters.flexvar import FlexVARAdapter
from sar_core.adapter import CheckpointError
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures"
TOK = FIX / "flexvar" / "FlexVAE_tiny.pth"
BB = FIX / "flexvar" / "FlexVARd2-tiny.pth"


def plain_backbone():
    return torch.load(BB, weights_only=True)


def same_state(a: dict, b: dict, skip=()):
    assert set(a) == set(b)
    for k in a:
        if k not in skip:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_fixture_loads_with_inferred_sizes():
    ad = FlexVARAdapter.load(TOK, BB)
    t, b = ad.config.tokenizer, ad.config.backbone
    assert (t.codebook_size, t.codebook_embed_dim, t.ch, t.ch_mult, t.z_channels, t.num_res_blocks) == \
        (96, 32, 32, (1, 1, 1), 32, 2)
    assert (b.depth, b.embed_dim, b.num_heads, b.num_classes, b.pos_grid, b.mlp_ratio) == (2, 64, 2, 10, 32, 4.0)
    assert b.attn_l2_norm and not b.shared_aln
    sd = plain_backbone()
    got = ad.backbone.state_dict()
    for k, v in sd.items():
        if k != "attn_bias_for_masking":
            assert torch.equal(got[k], v), k
    # the stale mask (1,1,152,152) is ignored; ours is rebuilt for the default schedule
    assert sd["attn_bias_for_masking"].shape == (1, 1, 152, 152)
    L = ad.default_schedule.total_tokens
    assert got["attn_bias_for_masking"].shape == (1, 1, L, L)


def test_nested_layout_and_wrapper_prefixes(tmp_path):
    sd = plain_backbone()
    nested = {"epoch": 179, "iter": 5, "trainer": {"var_wo_ddp": {f"module.{k}": v for k, v in sd.items()},
                                                    "config": {"patch_nums": [1, 2]}}}
    torch.save(nested, tmp_path / "ar-ckpt-epo179.pth")
    a = FlexVARAdapter.load(TOK, tmp_path / "ar-ckpt-epo179.pth")
    b = FlexVARAdapter.load(TOK, BB)
    same_state(a.backbone.state_dict(), b.backbone.state_dict())
    tok_plain = torch.load(TOK, weights_only=True)["model"]
    torch.save({f"_orig_mod.{k}": v for k, v in tok_plain.items()}, tmp_path / "tok_plain.pth")
    c = FlexVARAdapter.load(tmp_path / "tok_plain.pth", BB)
    same_state(c.tokenizer.state_dict(), b.tokenizer.state_dict())


def test_optional_keys_rebuilt(tmp_path):
    sd = {k: v for k, v in plain_backbone().items()
          if not k.endswith(("zero_k_bias", "attn_bias_for_masking"))}
    torch.save(sd, tmp_path / "bb.pth")
    tok = {k: v for k, v in torch.load(TOK, weights_only=True)["model"].items() if k != "quantize.codebook_used"}
    torch.save({"model": tok}, tmp_path / "tok.pth")
    ad = FlexVARAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
    assert torch.equal(ad.backbone.blocks[0].attn.zero_k_bias, torch.zeros(64))
    ad.save(tmp_path / "tok2.pth", None)
    written = torch.load(tmp_path / "tok2.pth", weights_only=True)["model"]
    assert written["quantize.codebook_used"].shape == (65536,)


@pytest.mark.parametrize("layout", ["plain", "trainer-weights", "nested"])   # nested: the old name
def test_save_load_round_trip_bit_exact(tmp_path, layout):
    ad = FlexVARAdapter.load(TOK, BB)
    with torch.no_grad():   # make sure weights differ from the fixture's
        for p in ad.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ad.save(tmp_path / "tok.pth", tmp_path / "bb.pth", layout=layout)
    raw = torch.load(tmp_path / "bb.pth", weights_only=True)
    if layout != "plain":   # the weights where train.py keeps them, not a resumable train.py checkpoint
        assert set(raw["trainer"]) >= {"var_wo_ddp"} and "var_opt" not in raw["trainer"] and "args" not in raw
        raw = raw["trainer"]["var_wo_ddp"]
    # upstream loads strictly: same key set and shapes as the released layout
    ref = plain_backbone()
    assert set(raw) == set(ref)
    for k in ref:
        if k != "attn_bias_for_masking":
            assert raw[k].shape == ref[k].shape, k
    tok_raw = torch.load(tmp_path / "tok.pth", weights_only=True)
    tok_ref = torch.load(TOK, weights_only=True)
    assert set(tok_raw) == {"model"} and set(tok_raw["model"]) == set(tok_ref["model"])
    back = FlexVARAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
    same_state(back.backbone.state_dict(), ad.backbone.state_dict())
    same_state(back.tokenizer.state_dict(), ad.tokenizer.state_dict())
    with pytest.raises(ValueError, match="layout"):
        ad.save(None, tmp_path / "x.pth", layout="zip")


def test_from_config_save_load(tmp_path):
    ad = FlexVARAdapter.from_config({"tokenizer": {"codebook_size": 40, "ch": 32, "ch_mult": (1, 1),
                                                   "z_channels": 32},
                                     "backbone": {"depth": 2, "embed_dim": 64, "num_heads": 4,
                                                  "num_classes": 3, "shared_aln": True}})
    ad.save(tmp_path / "t.pth", tmp_path / "b.pth")
    back = FlexVARAdapter.load(tmp_path / "t.pth", tmp_path / "b.pth")
    assert back.config.backbone.num_heads == 4 and back.config.backbone.shared_aln
    same_state(back.backbone.state_dict(), ad.backbone.state_dict())
    x = torch.randn(1, 4, 32)
    ad.backbone.eval(), back.backbone.eval()
    ad.backbone.cond_drop_rate = back.backbone.cond_drop_rate = 0.0
    assert torch.equal(ad.forward(torch.tensor([1]), x, Schedule([1, 2])),
                       back.forward(torch.tensor([1]), x, Schedule([1, 2])))


def test_missing_and_corrupted_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        FlexVARAdapter.load(tmp_path / "nope.pth", BB)
    (tmp_path / "bad.pth").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupted"):
        FlexVARAdapter.load(TOK, tmp_path / "bad.pth")
    trunc = TOK.read_bytes()[:5000]
    (tmp_path / "trunc.pth").write_bytes(trunc)
    with pytest.raises(CheckpointError):
        FlexVARAdapter.load(tmp_path / "trunc.pth", BB)


def test_missing_and_mismatched_keys_listed(tmp_path):
    sd = plain_backbone()
    del sd["blocks.1.ffn.fc2.weight"]
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bb.pth")
    with pytest.raises(CheckpointError) as info:
        FlexVARAdapter.load(TOK, tmp_path / "bb.pth")
    msg = str(info.value)
    assert "blocks.1.ffn.fc2.weight" in msg and "extra.weight" in msg and "FlexVAR" in msg
    with pytest.raises(CheckpointError, match="blocks.2"):
        FlexVARAdapter.load(TOK, BB, overrides={"backbone.depth": 3})
    tok = torch.load(TOK, weights_only=True)
    tok["model"]["quantize.embedding.weight"] = torch.randn(50, 32)
    torch.save(tok, tmp_path / "tok.pth")
    with pytest.raises(CheckpointError, match="96"):
        FlexVARAdapter.load(tmp_path / "tok.pth", BB)


def test_overrides_win():
    ad = FlexVARAdapter.load(TOK, BB, overrides={"cond_drop_rate": 0.0, "train_patch_nums": (1, 2, 4, 8)})
    assert ad.backbone.cond_drop_rate == 0.0
    assert ad.default_schedule.sides == (1, 2, 4, 8)
    fresh = FlexVARAdapter.load(TOK, None, overrides={"depth": 1, "embed_dim": 64, "num_heads": 2,
                                                      "num_classes": 4})
    assert len(fresh.backbone.blocks) == 1 and fresh.backbone.head.out_features == 96


@pytest.mark.parametrize("tok,bb,needle", [
    (FIX / "var" / "vae_ch32v64z8.pth", BB, "VAR"),
    (TOK, FIX / "var" / "var_tiny_d2w64.pth", "VAR"),
    (BB, BB, "transformer checkpoint"),
    (TOK, TOK, "tokenizer checkpoint"),
])
def test_wrong_family_is_named(tok, bb, needle):
    with pytest.raises(CheckpointError, match=needle) as info:
        FlexVARAdapter.load(tok, bb)
    if needle == "VAR":
        assert "var" in str(info.value)


def test_plugins_listing():
    out = subprocess.run([sys.executable, "-m", "sar_cli.main", "plugins", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    names = {(e["kind"], e["name"]): e for e in data["entries"]}
    assert names[("adapter", "flexvar")]["object"].endswith("FlexVARAdapter")
    assert names[("schedule", "flexvar-random")]["object"].endswith("FlexVARRandomSchedule")
    assert not [e for e in data["errors"] if "flexvar" in e]
