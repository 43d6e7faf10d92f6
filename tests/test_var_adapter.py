"""VAR adapter: golden-case parity, phi rule, stagger inputs, sub-schedules, sampling, config inference."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from sar_adapters.var import VARAdapter, VARConfig, infer_var_config
from sar_adapters.var.config import infer_patch_nums
from sar_adapters.var.tokenizer import phi_index
from sar_core.adapter import CheckpointError
from sar_adapters.var.case import VARCaseRunner
from sar_core.conformance import compare_key, run_case
from sar_core.schedule import Schedule

FIX = Path(__file__).parent / "fixtures" / "var"
INPUT_KEYS = ("images", "labels", "infer_labels")


@pytest.fixture(scope="module")
def config():
    return json.loads((FIX / "config.json").read_text())


@pytest.fixture(scope="module")
def case():
    return torch.load(FIX / "case.pt", weights_only=True)


@pytest.fixture(scope="module")
def adapter(config):
    files = config["files"]
    return VARAdapter.load(FIX / files["tokenizer"], FIX / files["backbone"],
                           overrides=VARCaseRunner().overrides(config))


@pytest.fixture(scope="module")
def computed(adapter, case, config):
    return run_case(adapter, {k: case[k] for k in INPUT_KEYS}, config)


@pytest.fixture(scope="module")
def tiny():
    cfg = VARConfig(vocab_size=16, Cvae=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, depth=2, embed_dim=32,
                    num_heads=2, num_classes=5, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0)
    torch.manual_seed(0)
    return VARAdapter.from_config(cfg)


# ------------------------------------------------------------------ golden case
RECORDED = ["enc_f", "gt_idx", "gt_idx_cat", "f_hat_per_scale", "x_BLCv_wo_first_l", "tf_logits", "tf_loss",
            "recon_img", "infer_idx", "infer_logits_cfg", "infer_img"]


@pytest.mark.parametrize("key", RECORDED)
def test_case_key_matches_upstream(key, computed, case):
    assert key in computed, f"run_case did not compute {key}"
    res = compare_key(key, computed[key], case[key])
    assert res.status == "pass", f"{key}: max abs {res.max_abs} ({res.note})"
    if res.kind == "exact":
        assert res.max_abs == 0


def test_case_covers_every_recorded_output(computed, case):
    missing = set(case) - set(computed) - set(INPUT_KEYS) - {"meta"}
    assert not missing


def test_pure_inference_matches_case_runner_overrides(adapter, case):
    """Sizes inferred from the checkpoints alone give the same model as config.json."""
    plain = VARAdapter.load(FIX / "vae_ch32v64z8.pth", FIX / "var_tiny_d2w64.pth")
    assert plain.config == adapter.config
    assert plain.config.patch_nums == tuple(case["meta"]["patch_nums"])


def test_kit_pins_eval_dropout_float32_and_restores(tiny):
    """The kit's run_case forces eval, no class dropout and float32 (autocast off), then
    puts the trainer's settings back."""
    sched = tiny.default_schedule
    images = torch.rand(2, 3, *tiny.image_size(sched)) * 2 - 1
    case = {"images": images, "labels": torch.tensor([1, 2])}
    tiny.backbone.cond_drop_rate = 1.0
    tiny.backbone.train()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_case(tiny, case, {})
        assert out["tf_logits"].dtype == torch.float32
        assert tiny.backbone.cond_drop_rate == 1.0 and tiny.backbone.training
        tiny.backbone.eval()
        tiny.backbone.cond_drop_rate = 0.0
        ref = tiny.backbone(case["labels"], out["x_BLCv_wo_first_l"], sched)
        torch.testing.assert_close(out["tf_logits"], ref, rtol=0, atol=0)
        assert "infer_idx" not in out  # no inference labels, nothing sampled
    finally:
        tiny.backbone.cond_drop_rate = 0.0
        tiny.backbone.eval()


# ------------------------------------------------------------------ tokenizer rules
@pytest.mark.parametrize("SN,table", [(10, [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]), (6, [0, 0, 1, 2, 3, 3]), (5, [0, 1, 2, 2, 3])])
def test_phi_index_table(SN, table):
    assert [phi_index(si, SN, 4) for si in range(SN)] == table


def test_phi_index_other_sharing():
    assert [phi_index(si, 3, 1) for si in range(3)] == [0, 0, 0]
    assert [phi_index(si, 3, 3) for si in range(3)] == [0, 1, 2]  # non-shared: one per scale


def test_stagger_is_what_the_sampler_would_feed(adapter, computed):
    """Scale k+1 input = area-downsample of f_hat built from gt below k and pred at k."""
    tok, sched = adapter.tokenizer, adapter.default_schedule
    sides, k = sched.sides, 3
    gt = computed["gt_idx"]
    pred = [None] * len(gt)
    pred[k] = torch.flip(gt[k], dims=[1])
    mixed = gt[:k] + [pred[k]]
    f_hat = torch.zeros(2, adapter.config.Cvae, sides[-1], sides[-1])
    nxt = None
    for si, codes in enumerate(mixed):
        h = tok.quantize.codes_to_map(codes, sides[si])
        nxt = tok.next_input(f_hat, h, si, sides)
    st = adapter.stagger_inputs(gt, pred, sched, [k])
    sl = slice(sched.offsets[k + 1] - 1, sched.offsets[k + 2] - 1)
    torch.testing.assert_close(st[:, sl], nxt, rtol=0, atol=1e-6)


def test_stagger_rejects_bad_scales(adapter, computed):
    sched = adapter.default_schedule
    gt = computed["gt_idx"]
    with pytest.raises(ValueError, match="None"):
        adapter.stagger_inputs(gt, [None] * len(gt), sched, [1])


# ------------------------------------------------------------------ backbone

def test_sub_schedule_and_student_forcing(adapter, case):
    """[first, k] picks pos/lvl rows of those scales; student forcing only drops pos_start."""
    bb, full = adapter.backbone, adapter.default_schedule
    bb.cond_drop_rate = 0.0
    try:
        x, labels = case["x_BLCv_wo_first_l"], case["labels"]
        k = len(full) - 1
        short = full.sub([0, k])
        xs = x[:, full.offsets[k] - 1:]
        ref = bb(labels, x, full)
        out = bb(labels, xs, short)
        assert out.shape == (2, 1 + full.token_counts[k], adapter.config.vocab_size)
        torch.testing.assert_close(out[:, :1], ref[:, :1], rtol=1e-5, atol=1e-5)  # start token sees itself only
        assert not torch.allclose(out[:, 1:], ref[:, full.slice(k)], atol=1e-3)   # coarser scales missing
        sf = bb(labels, xs, short, student_forcing=True)
        assert not torch.allclose(sf, out)
        saved = bb.pos_start.detach().clone()
        with torch.no_grad():
            bb.pos_start.zero_()
        try:
            torch.testing.assert_close(bb(labels, xs, short), bb(labels, xs, short, student_forcing=True), rtol=0, atol=0)
        finally:
            with torch.no_grad():
                bb.pos_start.copy_(saved)
        with pytest.raises(ValueError, match="patch_nums"):
            bb(labels, xs, Schedule([1, 7]))
    finally:
        bb.cond_drop_rate = 0.1


def test_generate_resets_kv_cache_on_error(adapter, case):
    with pytest.raises(Exception):
        adapter.generate(torch.tensor([0, 99]), adapter.default_schedule, cfg=1.0)  # label out of range
    assert all(b.attn.cached_k is None and not b.attn.caching for b in adapter.backbone.blocks)
    with pytest.raises(ValueError, match="schedule"):
        adapter.generate(case["infer_labels"], Schedule([1, 2, 3]), cfg=1.0)


def test_contract_basics(adapter):
    assert adapter.name == "var" and adapter.bits_per_token is None
    labels = torch.tensor([2, 4])
    assert adapter.cfg_condition(labels).tolist() == [2, 4, 10, 10]
    assert adapter.default_schedule.sides == adapter.config.patch_nums
    assert adapter.image_size(Schedule([1, 2, 16])) == (16 * adapter.config.downsample,) * 2
    for kw in ("pos_1LC", "pos_start", "lvl_embed", "scale_mul", "gamma", "beta", "ada_gss"):
        assert kw in adapter.no_decay_keywords


def test_from_config_trains(tiny):
    sched = tiny.default_schedule
    images = torch.rand(2, 3, *tiny.image_size(sched)) * 2 - 1
    codes = tiny.encode(images, sched)
    x = tiny.teacher_inputs(codes, sched)
    tiny.backbone.train()
    logits = tiny.forward(torch.tensor([0, 4]), x, sched)
    assert logits.shape == (2, sched.total_tokens, 16) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.cat(codes, 1).flatten())
    loss.backward()
    grads = {n: p.grad for n, p in tiny.backbone.named_parameters()}
    assert all(g is not None for g in grads.values())
    assert grads["pos_1LC"].abs().sum() > 0 and grads["head.weight"].abs().sum() > 0
    tiny.backbone.zero_grad()
    tiny.backbone.eval()
    tok = tiny.tokenizer
    saved = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.train().requires_grad_(True)
    opt = torch.optim.Adam(tok.parameters(), lr=2e-3)
    losses = []
    try:
        for _ in range(5):
            tok_loss, stats = tiny.tokenizer_training_loss(images, sched)
            opt.zero_grad()
            tok_loss.backward()
            assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
            assert tok.quantize.embedding.weight.grad.abs().sum() > 0
            opt.step()
            losses.append(tok_loss.item())
        assert set(stats) == {"rec_l1", "rec_mse", "vq"} and losses[-1] < losses[0]
    finally:
        tok.load_state_dict(saved)
        tok.eval().requires_grad_(False)


def test_case_runner_overrides_read_config_json(config):
    ov = VARCaseRunner().overrides(config)
    assert ov["patch_nums"] == tuple(config["patch_nums"]) and ov["quant_resi"] == config["tokenizer"]["quant_resi"]
    assert ov["using_znorm"] is False and "cond_drop_rate" not in ov  # a prose value is skipped
    assert set(ov) <= set(VARConfig.model_fields)


# ------------------------------------------------------------------ config inference
def _sds():
    return (torch.load(FIX / "vae_ch32v64z8.pth", weights_only=True),
            torch.load(FIX / "var_tiny_d2w64.pth", weights_only=True))


def test_infer_sizes_from_shapes(config):
    tok, bb = _sds()
    cfg = infer_var_config(tok, bb)
    t, b = config["tokenizer"], config["backbone"]
    assert (cfg.vocab_size, cfg.Cvae, cfg.ch, list(cfg.ch_mult)) == (t["vocab_size"], t["Cvae"], t["ch"], t["ch_mult"])
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes) == (b["depth"], b["embed_dim"], b["num_heads"], b["num_classes"])
    assert cfg.share_quant_resi == t["share_quant_resi"] and cfg.mlp_ratio == b["mlp_ratio"]
    assert list(cfg.patch_nums) == config["patch_nums"]
    assert cfg.drop_path_rate == pytest.approx(b["drop_path_rate"])


def test_patch_nums_without_buffers_by_search():
    _, bb = _sds()
    del bb["lvl_1L"], bb["attn_bias_for_masking"]
    assert infer_patch_nums(bb) == (1, 2, 3, 4, 6, 8)  # the unique fit of L=130 over 6 scales


def _fake_backbone(L, SN, C=8):
    return {"pos_1LC": torch.zeros(1, L, C), "lvl_embed.weight": torch.zeros(SN, C), "pos_start": torch.zeros(1, 1, C)}


def test_patch_nums_official_preferred_unique_searched_ambiguous_refused():
    assert infer_patch_nums(_fake_backbone(680, 10)) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    assert infer_patch_nums(_fake_backbone(2240, 10)) == (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
    by_L = {}
    for sides in itertools.combinations(range(2, 13), 3):
        by_L.setdefault(1 + sum(s * s for s in sides), []).append((1,) + sides)
    # a side of 13 or more needs L >= 1 + 4 + 9 + 169: below that, the enumeration is complete
    complete = {L: v for L, v in by_L.items() if L < 1 + 4 + 9 + 169}
    unique = [v[0] for v in complete.values() if len(v) == 1]
    ambiguous = [L for L, v in complete.items() if len(v) > 1]
    assert len(unique) > 5 and ambiguous
    for pn in unique:
        assert infer_patch_nums(_fake_backbone(sum(s * s for s in pn), 4)) == pn
    with pytest.raises(CheckpointError, match="several schedules fit"):
        infer_patch_nums(_fake_backbone(ambiguous[0], 4))
    with pytest.raises(CheckpointError, match="no increasing schedule fits"):
        infer_patch_nums(_fake_backbone(3, 4))


def test_overrides_win_and_conflicts_are_clear():
    tok, bb = _sds()
    cfg = infer_var_config(tok, bb, {"quant_resi": 0.25, "using_znorm": True, "cond_drop_rate": 0.0})
    assert cfg.quant_resi == 0.25 and cfg.using_znorm and cfg.cond_drop_rate == 0.0
    with pytest.raises(CheckpointError, match="depth=3"):
        infer_var_config(tok, bb, {"depth": 3})
    with pytest.raises(CheckpointError, match="patch_nums"):
        infer_var_config(tok, bb, {"patch_nums": [1, 2, 3, 4, 5, 6]})
    with pytest.raises(ValueError, match="unknown VAR config fields"):
        infer_var_config(tok, bb, {"dpeth": 2})
    bb2 = dict(bb)
    bb2["head.weight"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match="vocab_size"):
        infer_var_config(tok, bb2)


def test_sar_plugins_lists_var():
    from typer.testing import CliRunner

    from sar_cli.main import app

    res = CliRunner().invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["entries"]
    assert any(r["kind"] == "adapter" and r["name"] == "var" and r["object"].endswith("VARAdapter") for r in rows)
