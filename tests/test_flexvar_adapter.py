"""FlexVAR adapter against the public golden case (real upstream outputs), plus the
behaviours the case cannot show: stagger inputs, sampling rules, schedules, AMP dtype."""

import json
import random
from pathlib import Path

import pytest
import torch

from sar_adapters.flexvar import FlexVARAdapter, FlexVARConfig, FlexVARRandomSchedule
from sar_adapters.flexvar.sampler import effective_top_k, guidance_scale
from sar_adapters.flexvar.schedules import draw_patch_nums
from sar_core.conformance import compare_key, run_case
from sar_core.schedule import Schedule, ScheduleSampler

CASE = Path(__file__).parent / "fixtures" / "flexvar"
INPUT_KEYS = ("images", "labels", "tf_patch_nums", "infer_patch_nums", "infer_labels", "schedule_seeds")
TF_KEYS = ("enc_h", "gt_idx", "gt_idx_cat", "x_BLCv_wo_first_l", "tf_logits", "tf_loss", "recon_img")
INFER_KEYS = ("infer_idx", "infer_logits_cfg", "infer_img", "infer_llamagen_idx",
              "infer_llamagen_logits_cfg", "infer_llamagen_img")


def load_adapter():
    return FlexVARAdapter.load(CASE / "FlexVAE_tiny.pth", CASE / "FlexVARd2-tiny.pth")


@pytest.fixture(scope="module")
def golden():
    return torch.load(CASE / "case.pt", weights_only=True), json.loads((CASE / "config.json").read_text())


@pytest.fixture(scope="module")
def adapter():
    return load_adapter()


@pytest.fixture(scope="module")
def computed(golden):
    case, config = golden
    inputs = {k: case[k] for k in INPUT_KEYS}   # run from inputs only
    torch.manual_seed(0)
    return run_case(load_adapter(), inputs, config)


def _check(key, computed, case):
    assert key in computed, f"run_case did not produce {key}"
    res = compare_key(key, computed[key], case[key])
    assert res.status == "pass", f"{key}: {res.note} max abs {res.max_abs}"


@pytest.mark.parametrize("key", TF_KEYS + INFER_KEYS)
def test_case_key_matches_upstream(key, computed, golden):
    _check(key, computed, golden[0])


def test_indices_exact(computed, golden):
    case = golden[0]
    for key in ("gt_idx", "infer_idx", "infer_llamagen_idx"):
        for got, want in zip(computed[key], case[key], strict=True):
            assert got.dtype == torch.int64 and torch.equal(got, want), key


@pytest.mark.parametrize("key", [
    "sar_tf_loss", "sar_sf_loss", "sar_total_loss", "sar_grad_norm", "sar_sf_scales",
    "sar_sf_input_idx", "sar_sf_input", "sar_sf_logits", "sar_sf_target",
    "sar_sampled_tf_loss", "sar_sampled_sf_loss", "sar_sampled_total_loss", "sar_sampled_grad_norm",
    "sar_sampled_sf_scales", "sar_sampled_sf_input", "sar_sampled_sf_logits",
    "sar_sampled_tf_labels", "sar_sampled_rollout_idx"])
def test_sar_keys_through_core(key, computed, golden):
    _check(key, computed, golden[0])


def test_schedule_samples_draw_for_draw(golden, computed):
    case = golden[0]
    assert len(case["schedule_seeds"]) == 16
    for seed, want in zip(case["schedule_seeds"], case["schedule_samples"], strict=True):
        assert FlexVARRandomSchedule(seed=seed).sample().sides == tuple(want)
        random.seed(seed)  # upstream seeds the global module; our draws use the same calls
        assert draw_patch_nums(random) == want
    assert computed["schedule_samples"] == case["schedule_samples"]


def test_random_schedule_statistics_and_replay():
    s = FlexVARRandomSchedule(seed=7)
    draws = [s.sample() for _ in range(300)]
    for sch in draws:
        assert sch.sides[:2] == (1, 2) and sch.total_tokens <= 680
        assert list(sch.sides) == sorted(set(sch.sides)) and sch.sides[-1] <= 16
    assert sum(d.sides[-1] == 16 for d in draws) > 150
    s2 = FlexVARRandomSchedule(seed=0)
    s2.load_state_dict(FlexVARRandomSchedule(seed=7).state_dict())
    assert [s2.sample() for _ in range(5)] == draws[:5]


def test_run_case_leaves_model_untouched(adapter, golden):
    case, config = golden
    before = {k: v.clone() for k, v in adapter.backbone.state_dict().items()}
    adapter.backbone.train()
    rate = adapter.backbone.cond_drop_rate
    run_case(adapter, {k: case[k] for k in ("images", "labels", "tf_patch_nums")},
             {"case": {"sar_csfl": config["case"]["sar_csfl"]}})
    assert adapter.backbone.training and adapter.backbone.cond_drop_rate == rate
    assert all(p.grad is None for p in adapter.backbone.parameters())
    for k, v in adapter.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    adapter.backbone.eval()


def test_stagger_input_is_the_upsampled_prediction(adapter, golden):
    """FlexVAR rule (generic stagger properties: tests/test_contract.py): the input of
    scale k+1 is bicubic(codewords of the prediction at k)."""
    case = golden[0]
    sch = Schedule(case["tf_patch_nums"].tolist())
    gt = adapter.encode(case["images"], sch)
    pred = [torch.randint(0, 96, c.shape, generator=torch.Generator().manual_seed(1)) for c in gt]
    k = 3
    st = adapter.stagger_inputs(gt, [None] * k + [pred[k]] + [None] * (len(sch) - k - 1), sch, [k])
    sl = slice(sch.offsets[k + 1] - 1, sch.offsets[k + 2] - 1)   # input of scale k+1
    assert torch.equal(st[:, sl], adapter.tokenizer.upsampled_input(pred[k], sch[k], sch[k + 1]))


def test_student_forcing_pass_has_no_start_position(adapter, golden):
    case = golden[0]
    sch = Schedule([1, 4])
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    bb = adapter.backbone.eval()
    labels = case["labels"]
    sf = bb(labels, x, sch, student_forcing=True)
    tf = bb(labels, x, sch)
    assert sf.shape == tf.shape == (2, 17, 96)
    assert not torch.allclose(sf, tf)
    with torch.no_grad():
        saved = bb.pos_start.clone()
        bb.pos_start.zero_()
        try:
            assert torch.allclose(bb(labels, x, sch), sf, atol=1e-6)
        finally:
            bb.pos_start.copy_(saved)


def test_generate_images_and_greedy_rules(adapter):
    labels = torch.tensor([1, 3])
    sch = Schedule([1, 2, 3, 7, 9])       # 7 and 9 are not trained sides: greedy
    gen = adapter.generate(labels, sch, cfg=1.5, top_k=0, top_p=0.0,
                           generator=torch.Generator().manual_seed(0))
    assert [c.shape for c in gen.codes] == [(2, s * s) for s in sch.sides]
    assert gen.images.shape == (2, 3, 36, 36) == gen.raw_images.shape
    assert torch.equal(gen.images, gen.raw_images.add(1).div(2).clamp(0, 1))
    assert gen.images.min() >= 0 and gen.images.max() <= 1
    assert torch.equal(gen.codes[-1], gen.guided_logits[-1].argmax(-1))
    assert torch.equal(gen.codes[-2], gen.guided_logits[-2].argmax(-1))
    assert not torch.equal(gen.codes[2], gen.guided_logits[2].argmax(-1))   # side 3 is sampled
    assert effective_top_k(16, 900, 16) == 900 and effective_top_k(23, 900, 16) == 1
    assert effective_top_k(14, 900, 16) == 1
    assert guidance_scale(12, 13, 16, 2.0, 16) == pytest.approx(2.0 * 12 / 9)
    assert guidance_scale(3, 11, 23, 2.0, 16) == 2.0
    with pytest.raises(ValueError):
        guidance_scale(0, 1, 1, 2.0, 16)


def test_logits_dtype_follows_autocast(adapter):
    bb = adapter.backbone.eval()
    sch = Schedule([1, 2])
    x = torch.randn(2, 4, 32)
    assert bb(torch.tensor([1, 2]), x, sch).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bb(torch.tensor([1, 2]), x, sch).dtype == torch.bfloat16


def test_config_defaults_and_schedules():
    cfg = FlexVARConfig()
    assert cfg.train_schedule.sides == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    small = FlexVARConfig(tokenizer={"ch": 32, "ch_mult": (1, 1, 1), "z_channels": 32}, image_size=32)
    assert small.train_schedule.sides == (1, 2, 3, 4, 5, 6, 8)
    assert FlexVARConfig(train_patch_nums=(1, 2, 4)).infer_schedule.sides == (1, 2, 4)
    with pytest.raises(ValueError):
        FlexVARConfig(train_patch_nums=(2, 4))
    with pytest.raises(ValueError):
        FlexVARConfig(image_size=100)            # not a multiple of 16
    assert cfg.backbone.embed_dim == 1024 and cfg.backbone.num_heads == 16


def tiny_config(**extra):
    return FlexVARConfig(tokenizer={"codebook_size": 40, "ch": 32, "ch_mult": (1, 1), "z_channels": 32},
                         backbone={"depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 5,
                                   "pos_grid": 16}, **extra)


def test_from_config_trains_end_to_end():
    torch.manual_seed(0)
    ad = FlexVARAdapter.from_config(tiny_config(image_size=16))
    assert ad.default_schedule.sides == (1, 2, 3, 4, 5, 6, 8)
    assert ad.image_size(ad.default_schedule) == (16, 16)
    sch = Schedule([1, 2, 4, 8])
    imgs = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = ad.encode(imgs, sch)
    assert [c.shape for c in codes] == [(2, 1), (2, 4), (2, 16), (2, 64)]
    x = ad.teacher_inputs(codes, sch)
    assert x.shape == (2, sch.total_tokens - 1, 32)
    logits = ad.forward(torch.tensor([0, 4]), x, sch)
    assert logits.shape == (2, sch.total_tokens, 40)
    logits.float().mean().backward()
    assert ad.backbone.pos_1LC.grad is not None and ad.backbone.pos_1LC.grad.abs().sum() > 0
    assert all(p.grad is None for p in ad.tokenizer.parameters())
    assert ad.decode(codes, sch).shape == (2, 3, 16, 16)
    assert torch.equal(ad.cfg_condition(torch.tensor([0, 4])), torch.tensor([0, 4, 5, 5]))
    assert "pos_1LC" in ad.no_decay_keywords and "scale_mul" in ad.no_decay_keywords
    assert ad.bits_per_token is None


def test_schedule_sampler_choice():
    fixed = FlexVARAdapter.from_config(tiny_config(image_size=16))
    assert type(fixed.schedule_sampler(0)) is ScheduleSampler
    small = FlexVARAdapter.from_config(tiny_config(image_size=16, random_schedule=True))
    with pytest.raises(ValueError, match="16"):
        small.schedule_sampler(0)
    big = FlexVARAdapter.from_config(tiny_config(image_size=64, random_schedule=True))
    s = big.schedule_sampler(3)
    assert isinstance(s, FlexVARRandomSchedule) and s.sample().sides[-1] <= 16


def test_tokenizer_training_loss_fits():
    torch.manual_seed(0)
    ad = FlexVARAdapter.from_config(tiny_config(image_size=16))
    ad.tokenizer.train().requires_grad_(True)
    imgs = torch.rand(2, 3, 8, 8) * 2 - 1
    sch = Schedule([1, 2, 4])
    opt = torch.optim.Adam(ad.tokenizer.parameters(), lr=2e-3)
    first = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny convs: threads only add contention on a busy machine
    try:
        for _ in range(6):
            loss, stats = ad.tokenizer_training_loss(imgs, sch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = first if first is not None else loss.item()
    finally:
        torch.set_num_threads(threads)
    assert set(stats) == {"recon", "vq", "commit"}
    assert ad.tokenizer.quantize.embedding.weight.grad.abs().sum() > 0
    assert loss.item() < first


def test_sar_tf_then_single_sf_targets_ground_truth(adapter, golden):
    case, config = golden
    s = dict(config["case"]["sar_csfl"], training_mode="tf_then_single_sf")
    s.pop("sampled_variant")
    out = run_case(adapter, {k: case[k] for k in ("images", "labels", "tf_patch_nums")}, {"case": {"sar_csfl": s}})
    assert torch.equal(out["sar_sf_target"], case["gt_idx"][-1])
    assert torch.equal(out["sar_tf_loss"], case["sar_tf_loss"]) or abs(out["sar_tf_loss"] - case["sar_tf_loss"]) < 1e-5
    assert abs(out["sar_sf_loss"] - case["sar_sf_loss"]) > 1e-3   # a different target, a different loss
