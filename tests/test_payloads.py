"""Named condition payloads: the ``condition_payloads`` contract member and its checks,
``textimages`` with several payload columns, ``--payload NAME=FILE`` / ``--null-payload``,
and a two-payload family (``toy-pair``: pooled vector + token sequence, encoder-derived
null condition) that trains and samples through the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import toy_adapter as toy
import toy_pair_adapter as pair
from sar_core.batch import Padded, PayloadSpec, check_payloads
from sar_plugins.textimages import TextImageFolder, payload_path, textimages

POOLED_DIM, TEXT_DIM = 5, 6


def make_pair_folder(root, n=6, nulls=True, columns=(pair.POOLED, pair.TOKENS), size=(4, 8)):
    """A textimages folder with a pooled-vector column (a table) and a token column (files)."""
    g = torch.Generator().manual_seed(7)
    (root / "img").mkdir(parents=True)
    rows, pooled = [], {}
    for i in range(n):
        img = (torch.rand(*size, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"caption {i}"})
        pooled[rows[-1]["image"]] = torch.randn(1, POOLED_DIM, generator=g)
        tok = root / "payloads" / pair.TOKENS / payload_path(rows[-1]["image"])
        if pair.TOKENS in columns:
            tok.parent.mkdir(parents=True, exist_ok=True)
            torch.save(torch.randn(1 + i % 3, TEXT_DIM, generator=g), tok)
    if pair.POOLED in columns:
        (root / "payloads").mkdir(exist_ok=True)
        torch.save(pooled, root / "payloads" / f"{pair.POOLED}.pt")
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if nulls:
        torch.save({pair.POOLED: torch.zeros(1, POOLED_DIM), pair.TOKENS: torch.full((2, TEXT_DIM), 0.5)},
                   root / "null_payloads.pt")
    return root


@pytest.fixture
def reg(monkeypatch):
    return toy.use_registry(monkeypatch, pair.PLUGIN)


@pytest.fixture
def files(tmp_path):
    return pair.toy_pair_files(tmp_path)


def _model(files, *extra):
    return ("-f", "toy-pair", "--tokenizer", files[0], "--backbone", files[1], "--device", "cpu", *extra)


def _train(out, data, files, *extra):
    return toy.invoke("train", "-f", "toy-pair", "--tokenizer", files[0], "--backbone", files[1],
                      "--data", f"textimages:{data}", "--batch-size", "2", "--workers", "0", "--loggers", "jsonl",
                      "--steps", "2", "--lr", "1e-3", "--rollout", "ssr", "--csfl", "hard", "--cond-drop", "0.5",
                      "--out", out, *extra)


def _prompts(tmp_path, n=3):
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randn(n, POOLED_DIM, generator=g), tmp_path / "pooled.pt")  # (N, D): one row each
    torch.save([torch.randn(k, TEXT_DIM, generator=g) for k in (2, 1, 3)][:n], tmp_path / "tokens.pt")
    return ("--payload", f"{pair.POOLED}={tmp_path / 'pooled.pt'}",
            "--payload", f"{pair.TOKENS}={tmp_path / 'tokens.pt'}")


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    return lines[0]


# ------------------------------------------------------------------------- the checks
def test_check_payloads_names_the_missing_unexpected_or_misshapen_payload():
    specs = {"a": PayloadSpec(dim=4, rows=1), "b": PayloadSpec(dim=3), "c": PayloadSpec(required=False)}
    good = {"a": torch.zeros(1, 4), "b": Padded.pad([torch.zeros(2, 3), torch.zeros(5, 3)])}
    check_payloads(specs, good, "fam", "here")
    with pytest.raises(ValueError, match=r"missing condition payload 'b' \(n, 3\).*here gives a"):
        check_payloads(specs, {"a": good["a"]}, "fam", "here")
    with pytest.raises(ValueError, match="unexpected condition payload 'z' from here: family 'fam' reads a"):
        check_payloads(specs, {**good, "z": torch.zeros(1, 1)}, "fam", "here")
    with pytest.raises(ValueError, match="'b' from here has 7-wide rows; family 'fam' needs"):
        check_payloads(specs, {**good, "b": torch.zeros(2, 7)}, "fam", "here")
    with pytest.raises(ValueError, match="'a' from here has varying rows per sample.*exactly 1"):
        check_payloads(specs, {**good, "a": Padded.pad([torch.zeros(1, 4), torch.zeros(2, 4)])}, "fam", "here")
    with pytest.raises(ValueError, match="reads none .*class-conditional"):
        check_payloads({}, {"t": torch.zeros(1, 2)}, "var", "--payload")
    check_payloads({"t": PayloadSpec(required=False)}, {}, "inf", "data")  # e.g. labels do instead


def test_null_payloads_are_checked_and_drive_the_null_condition(files):
    a = pair.ToyPairAdapter.load(*files)
    batch_cond = {"pooled": torch.randn(2, POOLED_DIM), "features": torch.randn(2, 3, TEXT_DIM),
                  "lengths": torch.tensor([3, 1])}
    with pytest.raises(ValueError, match="needs the null payload 'clip_pooled'.*--null-payload clip_pooled=FILE"):
        a.null_condition(batch_cond)
    with pytest.raises(ValueError, match="missing condition payload 'clip_tokens'"):
        a.set_null_payloads({pair.POOLED: torch.zeros(POOLED_DIM)})
    with pytest.raises(ValueError, match="'clip_pooled' from the null payloads has 2 rows"):
        a.set_null_payloads({pair.POOLED: torch.zeros(2, POOLED_DIM), pair.TOKENS: torch.zeros(1, TEXT_DIM)})
    a.set_null_payloads({pair.POOLED: torch.zeros(POOLED_DIM), pair.TOKENS: torch.zeros(2, TEXT_DIM)})
    null = a.null_condition(batch_cond)
    assert null["lengths"].tolist() == [2, 2] and null["pooled"].shape == (2, POOLED_DIM)
    x = torch.zeros(2, a.default_schedule.total_tokens - 1, a.config.bits)
    with torch.no_grad():
        one = a.forward(null, x, a.default_schedule)
        a.set_null_payloads({pair.POOLED: torch.ones(1, POOLED_DIM), pair.TOKENS: torch.zeros(2, TEXT_DIM)})
        other = a.forward(a.null_condition(batch_cond), x, a.default_schedule)
        a.backbone.train()
        a.condition_dropout = 1.0   # dropout replaces every row by the (new) null payloads
        dropped = a.forward(batch_cond, x, a.default_schedule)
    assert not torch.allclose(one, other)
    torch.testing.assert_close(dropped, other, atol=1e-5, rtol=1e-5)
    assert "null_pooled" not in a.backbone.state_dict()   # in no checkpoint


def test_families_with_their_own_null_refuse_null_payloads():
    from pathlib import Path

    from sar_adapters.infinity import InfinityAdapter

    fix = Path(__file__).parent / "fixtures" / "infinity"
    inf = InfinityAdapter.load(fix / "infinity_vae_d16_tiny.pth", fix / "infinity_tiny_d4c4w64.pth")
    assert inf.condition_payloads == {"text_features": PayloadSpec(dim=256)}   # Ct5 of the checkpoint
    with pytest.raises(ValueError, match="'infinity' builds its own null condition.*drop --null-payload"):
        inf.set_null_payloads({"text_features": torch.zeros(1, 256)})
    a = toy.ToyAdapter.from_config(toy.ToyConfig())
    assert a.condition_payloads == {}   # class-conditional: the default reads no payloads


# ------------------------------------------------------------------------- textimages
def test_textimages_reads_named_columns_tables_and_null_payloads(tmp_path):
    make_pair_folder(tmp_path)
    ds = textimages(str(tmp_path), image_size=(4, 8))
    assert ds.payload_names == [pair.POOLED, pair.TOKENS] and len(ds) == 6
    x, target = ds[4]
    assert x.shape == (3, 4, 8) and set(target) == {pair.POOLED, pair.TOKENS}
    assert target[pair.POOLED].shape == (1, POOLED_DIM) and target[pair.TOKENS].shape == (2, TEXT_DIM)
    assert torch.equal(target[pair.TOKENS], torch.load(tmp_path / "payloads" / pair.TOKENS / "img/4.png.pt"))
    assert set(ds.null_payloads) == {pair.POOLED, pair.TOKENS}
    only = textimages(str(tmp_path), image_size=(4, 8), payloads=pair.TOKENS)
    assert set(only[0][1]) == {pair.TOKENS} and set(only.null_payloads) == {pair.TOKENS}
    with pytest.raises(ValueError, match="no payload column 'nope'"):
        textimages(str(tmp_path), payloads=["nope"])
    (tmp_path / "payloads" / pair.TOKENS / "img" / "5.png.pt").unlink()   # an unfinished encode
    with pytest.raises(ValueError, match="1 of 6 manifest entries have no payload 'clip_tokens' .e.g. img/5.png"):
        TextImageFolder(tmp_path)
    torch.save({}, tmp_path / "payloads" / f"{pair.TOKENS}.pt")
    with pytest.raises(ValueError, match="both a folder and a table"):
        TextImageFolder(tmp_path)


# ------------------------------------------------------------------------- the CLI
def test_two_payload_family_trains_and_samples_from_the_cli(tmp_path, reg, files):
    data = make_pair_folder(tmp_path / "data")
    out = tmp_path / "run"
    r = _train(out, data, files)
    assert r.exit_code == 0, r.output
    assert "null payloads clip_pooled, clip_tokens: the data's own" in r.output
    rows = toy.read_metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    assert all(math.isfinite(m[k]) and m["loss_tf"] > 0 and m["loss_csf"] > 0 for m in rows
               for k in ("loss", "loss_tf", "loss_csf", "grad_norm"))
    trained = (files[0], out / "backbone.pth")
    assert not torch.equal(torch.load(trained[1])["state_dict"]["pooled_proj.weight"],
                           torch.load(files[1])["state_dict"]["pooled_proj.weight"])  # the pooled vector trains
    prompts = _prompts(tmp_path)
    grids = []
    for nulls in ("a.pt", "b.pt"):   # the null payloads are what guidance subtracts
        torch.save({pair.POOLED: torch.randn(1, POOLED_DIM), pair.TOKENS: torch.randn(2, TEXT_DIM)}, tmp_path / nulls)
        r = toy.invoke("sample", *_model(trained), *prompts, "--null-payload", tmp_path / nulls, "--cfg", "4",
                       "--seed", "0", "--folder", tmp_path / nulls.replace(".pt", ""), "--grid", tmp_path / "g.png")
        assert r.exit_code == 0, r.output
        pngs = sorted((tmp_path / nulls.replace(".pt", "")).glob("*.png"))
        assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
        grids.append(np.stack([np.asarray(Image.open(p)) for p in pngs]))
    assert grids[0].shape == (3, 4, 8, 3) and not np.array_equal(grids[0], grids[1])
    r = toy.invoke("eval", *_model(trained), *prompts, "--null-payload", f"{pair.POOLED}={tmp_path / 'a.pt'}",
                   "--null-payload", f"{pair.TOKENS}={tmp_path / 'a.pt'}", "--reference", f"textimages:{data}",
                   "--reference-split", "train", "--metrics", "fid", "-n", "4", "--feature-extractor",
                   "digit-classifier", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["num_generated"] == 4


def test_missing_unexpected_payloads_and_null_payloads_fail_in_one_line(tmp_path, reg, files):
    prompts = _prompts(tmp_path)
    nulls = ("--null-payload", tmp_path / "data" / "null_payloads.pt")
    make_pair_folder(tmp_path / "data")
    line = _error_line(toy.invoke("sample", *_model(files), *prompts[:2], *nulls, "--grid", tmp_path / "g.png"))
    assert "missing condition payload 'clip_tokens'" in line and "--payload" in line
    torch.save([torch.zeros(1, 3)] * 3, tmp_path / "extra.pt")
    line = _error_line(toy.invoke("sample", *_model(files), *prompts, "--payload", f"extra={tmp_path / 'extra.pt'}",
                                  *nulls, "--grid", tmp_path / "g.png"))
    assert "unexpected condition payload 'extra'" in line
    line = _error_line(toy.invoke("sample", *_model(files), *prompts, "--grid", tmp_path / "g.png"))
    assert "needs the null payload 'clip_pooled'" in line and "--null-payload" in line
    line = _error_line(toy.invoke("sample", *_model(files), *prompts, "--text-features", tmp_path / "tokens.pt",
                                  *nulls, "--grid", tmp_path / "g.png"))
    assert "unexpected condition payload 'text_features'" in line
    assert not (tmp_path / "g.png").exists()
    # training data: a missing column, and no null payloads anywhere
    make_pair_folder(tmp_path / "one", columns=(pair.POOLED,))
    line = _error_line(_train(tmp_path / "r1", tmp_path / "one", files))
    assert "missing condition payload 'clip_tokens'" in line and "--data textimages:" in line
    make_pair_folder(tmp_path / "nonull", nulls=False)
    line = _error_line(_train(tmp_path / "r2", tmp_path / "nonull", files))
    assert "needs the null payload 'clip_pooled'" in line
    assert not (tmp_path / "r2" / "metrics.jsonl").exists()
    r = _train(tmp_path / "r3", tmp_path / "nonull", files, *nulls)   # given by flag instead
    assert r.exit_code == 0, r.output
    assert len(toy.read_metrics(tmp_path / "r3")) == 2
    line = _error_line(toy.invoke("diagnose", *_model(files), "--data", f"textimages:{tmp_path / 'one'}"))
    assert "missing condition payload 'clip_tokens'" in line
