"""``sar encode-text`` with tiny random T5 / CLIP encoders built offline: the features it
writes are what the encoder computes, ``sar train --data textimages:...`` trains on them
(the two-payload toy family with CLIP, Infinity with T5), prompts files feed ``sar sample
--payload``, and an interrupted run continues where it stopped."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

import toy_adapter as toy
import toy_pair_adapter as pair
from text_encoders import tiny_clip, tiny_t5

CAPTIONS = ["a red fox in snow", "two cats", "a blue bird on a tree", "red", "a tree in snow", "the fox"]
INF = Path(__file__).parent / "fixtures" / "infinity"
INF_MODEL = ("-f", "infinity", "--tokenizer", INF / "infinity_vae_d16_tiny.pth",
             "--backbone", INF / "infinity_tiny_d4c4w64.pth", "--device", "cpu")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {"clip": tiny_clip(root / "clip", CAPTIONS, hidden=pair.ToyPairConfig().text_dim,
                              projection=pair.ToyPairConfig().pooled_dim),
            "t5": tiny_t5(root / "t5", CAPTIONS, d_model=256)}   # Ct5 of the tiny Infinity fixture


@pytest.fixture
def reg(monkeypatch):
    return toy.use_registry(monkeypatch, pair.PLUGIN)


def captioned(root: Path, size=(4, 8), n=len(CAPTIONS)) -> Path:
    """A textimages folder with images and captions only (no features yet)."""
    (root / "img").mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        Image.fromarray((torch.rand(*size, 3, generator=g) * 255).byte().numpy()).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": CAPTIONS[i % len(CAPTIONS)]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "captions.jsonl"


def encode(captions, encoders, kind, *extra):
    return toy.invoke("encode-text", captions, "--encoder", kind, "--model", encoders[kind], "--device", "cpu",
                      "--batch-size", "4", *extra)


def _finite(out, n):
    rows = toy.read_metrics(out)
    assert [m["step"] for m in rows] == list(range(1, n + 1))
    assert all(math.isfinite(m[k]) and m["loss_tf"] > 0 for m in rows for k in ("loss", "loss_tf", "grad_norm"))


def test_clip_features_train_and_sample_the_two_payload_family(tmp_path, reg, encoders):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    manifest = captioned(tmp_path / "data")
    r = encode(manifest, encoders, "clip")
    assert r.exit_code == 0, r.output
    data = manifest.parent
    tokens = torch.load(data / "payloads" / pair.TOKENS / "img/2.png.pt")
    pooled = torch.load(data / "payloads" / pair.POOLED / "img/2.png.pt")
    assert tokens.shape == (2 + len(CAPTIONS[2].split()), 6) and pooled.shape == (1, 5)  # BOS + words + EOS
    tok = AutoTokenizer.from_pretrained(encoders["clip"])
    model = CLIPTextModelWithProjection.from_pretrained(encoders["clip"]).eval()
    with torch.no_grad():
        want = model(**tok([CAPTIONS[2]], return_tensors="pt"))
    torch.testing.assert_close(tokens, want.last_hidden_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, want.text_embeds, atol=1e-5, rtol=1e-5)
    nulls = torch.load(data / "null_payloads.pt")
    assert nulls[pair.TOKENS].shape == (2, 6) and nulls[pair.POOLED].shape == (1, 5)   # the empty prompt
    files = pair.toy_pair_files(tmp_path)
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy-pair", "--tokenizer", files[0], "--backbone", files[1], "--data",
                   f"textimages:{data}", "--batch-size", "2", "--workers", "0", "--loggers", "jsonl", "--steps", "2",
                   "--rollout", "ssr", "--cond-drop", "0.5", "--out", out)
    assert r.exit_code == 0, r.output
    _finite(out, 2)
    (tmp_path / "prompts.txt").write_text("a red tree\ntwo foxes in snow\n")
    r = encode(tmp_path / "prompts.txt", encoders, "clip", "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert [t.shape[0] for t in torch.load(tmp_path / "p" / f"{pair.TOKENS}.pt")] == [5, 6]
    r = toy.invoke("sample", "-f", "toy-pair", "--tokenizer", files[0], "--backbone", out / "backbone.pth",
                   "--device", "cpu", "--payload", f"{pair.POOLED}={tmp_path / 'p' / f'{pair.POOLED}.pt'}",
                   "--payload", f"{pair.TOKENS}={tmp_path / 'p' / f'{pair.TOKENS}.pt'}",
                   "--null-payload", tmp_path / "p" / "null_payloads.pt", "--folder", tmp_path / "s")
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "s").glob("*.png"))) == 2


def test_t5_features_train_infinity(tmp_path, encoders):
    manifest = captioned(tmp_path / "data", size=(64, 64), n=4)
    r = encode(manifest, encoders, "t5", "--max-length", "8")
    assert r.exit_code == 0, r.output
    feats = torch.load(manifest.parent / "payloads" / "text_features" / "img/1.png.pt")
    assert feats.shape == (len(CAPTIONS[1].split()) + 1, 256)   # words + EOS
    out = tmp_path / "run"
    r = toy.invoke("train", *INF_MODEL, "--data", f"textimages:{manifest.parent}", "--batch-size", "2",
                   "--workers", "0", "--loggers", "jsonl", "--steps", "1", "--rollout", "ssr", "--out", out)
    assert r.exit_code == 0, r.output
    _finite(out, 1)


def test_an_interrupted_encode_continues_where_it_stopped(tmp_path, encoders, monkeypatch):
    import sar_plugins.text_encode as te

    clean = captioned(tmp_path / "clean")
    assert encode(clean, encoders, "clip").exit_code == 0
    manifest = captioned(tmp_path / "data")
    real, calls = te.atomic_save, []

    def dying_save(obj, path):   # Ctrl-C in the middle of the second batch
        calls.append(path)
        if len(calls) == 1 + 2 * 4 + 2:   # the null payloads, a batch of 4 (2 files each), then 1 of the 5th's
            raise KeyboardInterrupt
        return real(obj, path)

    monkeypatch.setattr(te, "atomic_save", dying_save)
    r = encode(manifest, encoders, "clip")
    assert r.exit_code == 130 and "run the same command again" in r.output
    monkeypatch.setattr(te, "atomic_save", real)
    cols = manifest.parent / "payloads"
    assert len(list((cols / pair.TOKENS).rglob("*.pt"))) == 4 and len(list((cols / pair.POOLED).rglob("*.pt"))) == 5
    assert not list(manifest.parent.rglob("*.tmp"))   # atomic writes leave no partial file
    stamp = lambda p: (p.stat().st_ino, p.stat().st_mtime_ns)  # noqa: E731
    first = {p: stamp(p) for p in cols.rglob("*.pt")}
    r = encode(manifest, encoders, "clip")
    assert r.exit_code == 0, r.output
    assert "resumed: 4 of 6 captions were already encoded" in r.output
    for name in (pair.TOKENS, pair.POOLED):
        for i in range(len(CAPTIONS)):
            got = torch.load(manifest.parent / "payloads" / name / f"img/{i}.png.pt")
            torch.testing.assert_close(got, torch.load(clean.parent / "payloads" / name / f"img/{i}.png.pt"),
                                       atol=1e-5, rtol=1e-5)
    kept = [p for p in first if stamp(p) == first[p]]
    assert len(kept) == 8   # finished captions are not encoded again (the 5th had only one of its files)
    r = encode(manifest, encoders, "clip", "--max-length", "8")
    assert r.exit_code == 2 and "other settings (max_length 16 -> 8)" in r.output


def test_sigterm_stops_after_the_current_batch(tmp_path, encoders):
    from sar_plugins.text_encode import TextEncoder, manifest_job, run

    job = manifest_job(captioned(tmp_path / "data"))
    enc = TextEncoder("t5", encoders["t5"], torch.device("cpu"), torch.float32)
    seen = []
    before, written = run(job, enc, 2, seen.append, stop=lambda: True)
    assert (before, written, seen) == (0, 2, [0, 2])
    before, written = run(job, enc, 2, seen.append)
    assert (before, written) == (2, 4)


def test_encode_text_errors_are_one_line(tmp_path, encoders, monkeypatch):
    manifest = captioned(tmp_path / "data", n=2)
    r = toy.invoke("encode-text", manifest, "--encoder", "t5", "--model", tmp_path / "nowhere")
    assert r.exit_code == 2 and "local folder in save_pretrained layout" in r.output
    r = toy.invoke("encode-text", manifest, "--encoder", "t5", "--model", encoders["clip"])
    assert r.exit_code == 2 and "holds a 'clip_text_model' model, not a t5 text encoder" in r.output
    (tmp_path / "p.txt").write_text("x\n")
    r = encode(tmp_path / "p.txt", encoders, "t5")
    assert r.exit_code == 2 and "give --out DIR" in r.output
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    r = encode(manifest, encoders, "t5")
    assert r.exit_code == 2 and "pip install 'sar[text]'" in r.output
