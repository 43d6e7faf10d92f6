"""hf://OWNER/REPO/FILE[@REVISION] checkpoints (offline, against a hand-built hub cache) and
.safetensors files, read and written (issue 22, item 6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("huggingface_hub")  # the 'hub' extra; part of 'dev', so CI runs these

import toy_adapter as toy  # noqa: E402

from sar_core.adapter import CheckpointError  # noqa: E402
from sar_core.checkpoint_io import atomic_save, hub, load_file  # noqa: E402
from sar_core.plugins import get_registry  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
C1, C2 = "1" * 40, "2" * 40
FILES = {"var": ("var/vae_ch32v64z8.pth", "var/var_tiny_d2w64.pth"),
         "flexvar": ("flexvar/FlexVAE_tiny.pth", "flexvar/FlexVARd2-tiny.pth"),
         "infinity": ("infinity/infinity_vae_d16_tiny.pth", "infinity/infinity_tiny_d4c4w64.pth")}


def add_snapshot(cache: Path, repo: str, commit: str, files: dict[str, Path], main: bool = True) -> Path:
    """The layout huggingface_hub keeps: models--OWNER--REPO/snapshots/<commit>/FILE, refs/main."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for name, src in files.items():
        dst = root / "snapshots" / commit / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    if main:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline hub cache holding every family's tiny pair under own/<family> (commit C1)."""
    from huggingface_hub import constants

    folder = tmp_path / "hf" / "hub"
    for fam, (tok, bb) in FILES.items():
        add_snapshot(folder, f"own/{fam}", C1, {"tok/" + Path(tok).name: FIX / tok, Path(bb).name: FIX / bb})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folder


def refs(fam: str, rev: str = "") -> tuple[str, str]:
    tok, bb = FILES[fam]
    at = f"@{rev}" if rev else ""
    return f"hf://own/{fam}/tok/{Path(tok).name}{at}", f"hf://own/{fam}/{Path(bb).name}{at}"


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_references_parse_and_bad_ones_name_the_format():
    r = hub.parse("hf://FoundationVision/var/sub/var_d16.pth@v1.0")
    assert (r.repo_id, r.filename, r.revision) == ("FoundationVision/var", "sub/var_d16.pth", "v1.0")
    assert hub.parse("hf://a/b/c.pth").revision is None and str(r) == "hf://FoundationVision/var/sub/var_d16.pth@v1.0"
    for bad in ("hf://a/b", "hf://a//c", "hf://a/b/c@", "hf:///b/c"):
        with pytest.raises(CheckpointError, match=r"hf://OWNER/REPO/FILE\[@REVISION\]"):
            hub.parse(bad)


@pytest.mark.parametrize("family", sorted(FILES))
def test_every_family_loads_hub_references_from_the_offline_cache(cache, family):
    cls = get_registry().get("adapter", family)
    tok, bb = FILES[family]
    local = cls.load(FIX / tok, FIX / bb)
    for rev in ("", "main", C1):
        remote = cls.load(*refs(family, rev))
        assert same(local.backbone, remote.backbone) and same(local.tokenizer, remote.tokenizer)


def test_pinning_follows_the_commit_not_the_branch(cache, tmp_path):
    tok_ref, _ = refs("var")
    pinned = hub.pin(tok_ref)
    assert pinned == tok_ref + "@" + C1
    rec = hub.record(tok_ref)
    assert rec["commit"] == C1 and rec["path"].endswith(f"snapshots/{C1}/tok/vae_ch32v64z8.pth")
    # main moves to a commit whose file differs: the unpinned reference follows, the pinned one stays
    other = tmp_path / "other.pth"
    torch.save({"x": torch.ones(2)}, other)
    add_snapshot(cache, "own/var", C2, {"tok/vae_ch32v64z8.pth": other})
    assert hub.pin(tok_ref) == tok_ref + "@" + C2
    assert torch.equal(load_file(tok_ref)["x"], torch.ones(2))
    assert "quantize.embedding.weight" in load_file(pinned)


def test_missing_files_and_revisions_are_one_clear_error(cache):
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache .*HF_HUB_OFFLINE is set.*huggingface-cli download own/var nope.pth"):
        load_file("hf://own/var/nope.pth", "backbone")
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        load_file("hf://own/var/var_tiny_d2w64.pth@v9")


def test_env_vars_choose_the_cache_and_offline_mode(tmp_path):
    """HF_HOME / HF_HUB_OFFLINE as a user sets them (a fresh process reads them at import)."""
    add_snapshot(tmp_path / "home" / "hub", "own/var", C1, {"v.pth": FIX / FILES["var"][1]})
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("from sar_core.checkpoint_io import hub, load_file; r = hub.record('hf://own/var/v.pth'); "
            "print(r['path']); print(len(load_file('hf://own/var/v.pth')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path, n = out.stdout.split()
    assert path.startswith(str(tmp_path / "home" / "hub")) and int(n) > 10


def test_safetensors_round_trip_of_a_run_checkpoint_tree(tmp_path):
    tree = {"format": "x", "step": 3, "model": {"w": torch.randn(2, 3), "t": torch.randn(4)[1:3]},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(2), "step": torch.tensor(1.0)}},
                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": [0]}]},
            "rng": [{"python": (3, tuple(range(5)), None), "cuda": []}], "ema": None, "inf": float("inf")}
    path = atomic_save(tree, tmp_path / "c.safetensors")
    back = load_file(path)
    assert back["optimizer"]["state"][0]["step"] == 1.0 and list(back["optimizer"]["state"]) == [0]
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["rng"][0]["python"] == (3, tuple(range(5)), None) and back["ema"] is None
    assert back["inf"] == float("inf") and back["step"] == 3
    assert torch.equal(back["model"]["t"], tree["model"]["t"]) and torch.equal(back["model"]["w"], tree["model"]["w"])
    # a flat state dict stays a plain safetensors file, readable by safetensors itself
    atomic_save({"a": torch.ones(2)}, tmp_path / "p.safetensors")
    from safetensors.torch import load_file as st_load

    assert torch.equal(st_load(str(tmp_path / "p.safetensors"))["a"], torch.ones(2))


@pytest.mark.parametrize("family", sorted(FILES))
def test_every_family_writes_and_reads_safetensors(family, tmp_path):
    cls = get_registry().get("adapter", family)
    a = cls.load(*(FIX / f for f in FILES[family]))
    a.save(tmp_path / "t.safetensors", tmp_path / "b.safetensors")
    from safetensors.torch import load_file as st_load

    assert set(st_load(str(tmp_path / "b.safetensors"))) <= set(a.backbone.state_dict())  # plain state dict
    b = cls.load(tmp_path / "t.safetensors", tmp_path / "b.safetensors")
    assert same(a.backbone, b.backbone) and same(a.tokenizer, b.tokenizer)


def test_train_from_hub_records_pinned_files_and_resumes_after_main_moves(cache, tmp_path):
    out = tmp_path / "run"
    tok_ref, bb_ref = refs("var")
    base = ["train", "-f", "var", "--data", "digits", "--image-size", "64", "--batch-size", "2", "--workers", "0",
            "--rollout", "ssr", "--loggers", "jsonl", "--save-format", "safetensors", "--out", out]
    r = toy.invoke(*base, "--tokenizer", tok_ref, "--backbone", bb_ref, "--steps", "1")
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["tokenizer"] == tok_ref + "@" + C1 and saved["model"]["backbone"] == bb_ref + "@" + C1
    src = saved["model"]["sources"]["backbone"]
    assert src["commit"] == C1 and Path(src["path"]).is_file() and src["path"].startswith(str(cache))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001.safetensors"]
    assert not (out / "backbone.pth").exists()
    cls = get_registry().get("adapter", "var")
    exported = cls.load(FIX / FILES["var"][0], out / "backbone.safetensors")
    assert not same(exported.backbone, cls.load(*(FIX / f for f in FILES["var"])).backbone)  # it trained
    # main moves on; the resume reads config.yaml and keeps the run's commit
    other = tmp_path / "x.pth"
    torch.save({"x": torch.ones(1)}, other)
    add_snapshot(cache, "own/var", C2, {"var_tiny_d2w64.pth": other, "tok/vae_ch32v64z8.pth": other})
    r = toy.invoke("train", "--resume", "--out", out, "--steps", "2")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step_00000002.safetensors"
    # asking for the moved branch (now holding valid files) is another model: refused in one line
    add_snapshot(cache, "own/var", C2, {"var_tiny_d2w64.pth": FIX / FILES["var"][1],
                                        "tok/vae_ch32v64z8.pth": FIX / FILES["var"][0]})
    r = toy.invoke(*base, "--tokenizer", tok_ref, "--backbone", bb_ref, "--steps", "3", "--resume")
    assert r.exit_code == 2 and "cannot resume" in r.output and C2 in r.output


def test_a_study_pins_its_hub_models_once_for_every_arm(cache, tmp_path):
    from sar_core.study.config import load_study, read_families
    from sar_core.study.plan import RunSpec, arm_config

    models = tmp_path / "models.yaml"
    tok_ref, bb_ref = refs("var")
    models.write_text(yaml.safe_dump({"families": {"v": {"family": "var", "tokenizer": tok_ref, "backbone": bb_ref,
                                                         "data": "digits"}}}))
    preset = Path(__file__).parents[1] / "plugins" / "assets" / "studies" / "demo.yaml"
    study = load_study(preset, families=read_families(models))
    fam = study.families["v"]
    assert (fam.tokenizer, fam.backbone) == (tok_ref + "@" + C1, bb_ref + "@" + C1)
    assert yaml.safe_load(yaml.safe_dump(study.to_dict()))["families"]["v"]["backbone"] == bb_ref + "@" + C1
    run = arm_config(study, tmp_path / "study", RunSpec("v", "sar", 0))
    assert run.model.backbone == bb_ref + "@" + C1 and run.model.tokenizer == tok_ref + "@" + C1
