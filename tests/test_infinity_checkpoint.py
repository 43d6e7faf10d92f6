"""Infinity checkpoints: inferred sizes, strict round trips into the upstream key layout,
bare tokenizer names, errors that name the fix, non-square template schedules."""

from pathlib import Path

import pytest
import torch

from sar_adapters.infinity import InfinityAdapter
from sar_adapters.infinity.config import ffn_width
from sar_adapters.infinity.templates import TEMPLATES, rope_grid, template_schedule
from sar_core.adapter import CheckpointError
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "infinity"
TOK, BB = FIX / "infinity_vae_d16_tiny.pth", FIX / "infinity_tiny_d4c4w64.pth"


@pytest.fixture(scope="module")
def inf():
    return InfinityAdapter.load(TOK, BB)


def test_sizes_are_read_from_the_files(inf):
    t, b = inf.config.tokenizer, inf.config.backbone
    assert (t.codebook_dim, t.base_ch, t.ch_mult, t.num_res_blocks, t.patch_size) == (16, 24, (1, 1, 1), 2, 4)
    assert (b.depth, b.block_chunks, b.embed_dim, b.num_heads, b.mlp_hidden) == (4, 4, 64, 2, 256)
    assert (b.text_channels, b.text_maxlen, b.text_pool_heads) == (256, 128, 2)
    assert inf.code_space.bits == 16 and inf.code_space.logits_width == 32 and inf.num_classes is None
    assert inf.image_size(inf.default_schedule) == (64, 64)


def test_backbone_round_trip_strict_in_upstream_layout(inf, tmp_path):
    inf.save(tmp_path / "tok.pth", tmp_path / "bb.pth")
    up = torch.load(BB, weights_only=True)
    mine = torch.load(tmp_path / "bb.pth", weights_only=True)
    assert set(mine) == set(up)          # block_chunks.* keys and zero_k_bias buffers included
    for k in up:
        assert mine[k].shape == up[k].shape and torch.equal(mine[k], up[k]), k
    tok = torch.load(tmp_path / "tok.pth", weights_only=True)
    assert set(tok) == {"vae"}
    assert set(tok["vae"]) == set(torch.load(TOK, weights_only=True)["vae"])
    again = InfinityAdapter.load(tmp_path / "tok.pth", tmp_path / "bb.pth")
    assert again.config == inf.config


@pytest.mark.parametrize("layout", ["trainer-weights", "nested"])   # nested: the old name
def test_trainer_weights_layout_round_trip(inf, tmp_path, layout):
    inf.save(None, tmp_path / "bb.pth", layout=layout)
    raw = torch.load(tmp_path / "bb.pth", weights_only=True)
    assert set(raw["trainer"]) == {"gpt_fsdp"} and "args" not in raw   # weights only: not resumable upstream
    assert set(raw["trainer"]["gpt_fsdp"]) == set(torch.load(BB, weights_only=True))
    again = InfinityAdapter.load(TOK, tmp_path / "bb.pth")
    for a, b in zip(again.backbone.state_dict().values(), inf.backbone.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trainer-weights"):
        inf.save(None, tmp_path / "x.pth", layout="zip")


def test_bare_tokenizer_names_and_nested_backbone_load(inf, tmp_path):
    sd = torch.load(TOK, weights_only=True)["vae"]
    bare = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
            .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v for k, v in sd.items()}
    torch.save({"vae": bare}, tmp_path / "bare.pth")
    torch.save({"trainer": {"gpt_fsdp": {"module." + k: v for k, v in torch.load(BB, weights_only=True).items()}}},
               tmp_path / "train.pth")
    other = InfinityAdapter.load(tmp_path / "bare.pth", tmp_path / "train.pth")
    for a, b in zip(other.tokenizer.state_dict().values(), inf.tokenizer.state_dict().values()):
        assert torch.equal(a, b)
    assert other.config == inf.config


def test_shape_mismatch_names_keys_and_fix(tmp_path):
    sd = torch.load(BB, weights_only=True)
    sd["block_chunks.1.module.0.sa.scale_mul_1H11"] = torch.zeros(1, 1, 2, 1)   # another attention variant
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        InfinityAdapter.load(TOK, tmp_path / "bad.pth")
    msg = str(err.value)
    assert "block_chunks.1.module.0.sa.scale_mul_1H11: file (1, 1, 2, 1) vs model (1, 2, 1, 1)" in msg
    assert "fix:" in msg


def test_wrong_files_and_bit_width_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="swap --tokenizer and --backbone"):
        InfinityAdapter.load(BB, TOK)
    sd = torch.load(BB, weights_only=True)
    sd["word_embed.weight"] = torch.zeros(64, 32)
    sd["head.weight"], sd["head.bias"] = torch.zeros(64, 64), torch.zeros(64)
    torch.save(sd, tmp_path / "d32.pth")
    with pytest.raises(CheckpointError, match="32 bits per token.*d = 16"):
        InfinityAdapter.load(TOK, tmp_path / "d32.pth")


def test_ffn_width_rounds_half_to_even():
    assert [ffn_width(c) for c in (2048, 2080, 3360, 96, 160, 64)] == [8192, 8192, 13312, 512, 512, 256]


def test_non_square_templates_and_rope_grid():
    assert len(TEMPLATES) == 15
    s = template_schedule(0.75, "0.25M")
    assert len(s) == 10 and s[-1] == (27, 36) and s[3] == (6, 8)
    assert rope_grid(s) == (54, 72)
    assert template_schedule(1.3, "1M")[-1] == (72, 54)                 # nearest template (1.333)
    assert template_schedule(0.5, "0.06M").scales[:4] == ((1, 1), (2, 2), (2, 4), (3, 6))
    with pytest.raises(ValueError, match="not a prefix of any Infinity template"):
        rope_grid(Schedule([(1, 1), (3, 5)]))


def test_non_square_model_runs_tf_and_sampling():
    ad = InfinityAdapter.from_config({"tokenizer": {"codebook_dim": 8, "base_ch": 24, "ch_mult": (1, 1), "patch_size": 2},
                                      "backbone": {"depth": 2, "embed_dim": 64, "num_heads": 2, "block_chunks": 2,
                                                   "text_channels": 16, "text_maxlen": 8},
                                      "h_div_w": 0.5, "pn": "0.06M"})
    sch = ad.default_schedule
    assert sch[-1] == (11, 22) and ad.image_size(sch) == (22, 44)
    images = torch.rand(2, 3, 22, 44) * 2 - 1
    codes = ad.encode(images, sch)
    assert [tuple(c.shape) for c in codes][-1] == (2, 11 * 22, 8)
    cond = ad.text_condition(torch.randn(5, 16), [2, 3])
    with ad.inference():
        logits = ad.forward(cond, ad.teacher_inputs(codes, sch), sch)
        gen = ad.generate(cond, sch, cfg=2.0, top_k=0, top_p=0.9, generator=torch.Generator().manual_seed(0))
        tf = ad.forward(cond, ad.teacher_inputs(gen.codes, sch), sch)
    assert logits.shape == (2, sch.total_tokens, 16)
    assert gen.images.shape == (2, 3, 22, 44) and 0 <= gen.images.min() and gen.images.max() <= 1
    # the KV-cached sampler is teacher forcing scale by scale: its conditional logits equal TF on its own codes
    with ad.inference():
        cond_only = ad.generate(cond, sch, cfg=1.0, generator=torch.Generator().manual_seed(0))
        tf1 = ad.forward(cond, ad.teacher_inputs(cond_only.codes, sch), sch)
    assert torch.allclose(torch.cat(cond_only.guided_logits, 1), tf1, atol=1e-4)
    assert tf.shape == logits.shape


def test_spatial_patchify_is_inferred_and_consistent(tmp_path):
    """Infinity-8B layout: the transformer predicts 4d bits per token on a grid half the
    tokenizer's; labels, inputs, sampling and decoding go through pixel_unshuffle(2)."""
    cfg = {"tokenizer": {"codebook_dim": 4, "base_ch": 24, "ch_mult": (1, 1), "patch_size": 2},
           "backbone": {"depth": 2, "embed_dim": 64, "num_heads": 2, "block_chunks": 2, "text_channels": 16,
                        "text_maxlen": 8, "drop_path_rate": 0.0}, "spatial_patchify": True, "pn": "0.06M"}
    torch.manual_seed(0)
    ad = InfinityAdapter.from_config(cfg)
    assert ad.code_space.bits == 16 and ad.backbone.word_embed.in_features == 16
    sch = ad.default_schedule
    assert ad.image_size(sch) == (64, 64)                      # 16x16 tokens, tokenizer grid 32x32, stride 2
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = ad.encode(images, sch)
    assert tuple(codes[-1].shape) == (2, 256, 16)
    q = ad.tokenizer.features(images)
    from sar_adapters.infinity import bsq
    tok = bsq.multiscale(q, ad.grid.tok_schedule(sch))
    want = torch.nn.functional.pixel_unshuffle(tok.labels[-1].view(2, 32, 32, 4).permute(0, 3, 1, 2).float(), 2)
    assert torch.equal(codes[-1], want.flatten(2).transpose(1, 2).long())   # channel 4c + 2i + j
    assert torch.allclose(ad.decode(codes, sch), ad.tokenizer.decode_map(tok.fhat.squeeze(2)), atol=1e-6)
    cond = ad.text_condition(torch.randn(5, 16), [2, 3])
    with ad.inference():
        gen = ad.generate(cond, sch, cfg=1.0, generator=torch.Generator().manual_seed(0))
        tf = ad.forward(cond, ad.teacher_inputs(gen.codes, sch), sch)
    assert torch.allclose(torch.cat(gen.guided_logits, 1), tf, atol=1e-4)
    ad.save(tmp_path / "t.pth", tmp_path / "b.pth")
    again = InfinityAdapter.load(tmp_path / "t.pth", tmp_path / "b.pth")
    assert again.config.spatial_patchify and again.code_space.bits == 16
