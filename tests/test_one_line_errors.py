"""Issue 19 item 8: one error line everywhere (conformance with a bad case, a bad
``--config`` / ``--model-config`` file), code-cache builds killed mid-write leave nothing
behind for long, and ``file_mode()`` reads the umask without changing it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import toy_adapter as toy
from sar_core import checkpoint_io

FIXTURES = Path(__file__).parent / "fixtures"


def one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Usage:" not in r.output and "Traceback" not in r.output and "╭" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_conformance_with_a_bad_case_is_one_line(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "var", bad)
    # not a VAR backbone: a long error (rich wrapped it over several lines)
    torch.save({f"blocks.{i}.weight": torch.zeros(3) for i in range(20)}, bad / "var_tiny_d2w64.pth")
    one_error_line(toy.invoke("conformance", bad), "var_tiny_d2w64.pth", "missing", "head.weight")


@pytest.mark.parametrize("text", ["a: [1,\n", "- 1\n- 2\n", "famliy: var\n"])
def test_sample_with_a_bad_config_file_is_one_line(tmp_path, text):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    one_error_line(toy.invoke("sample", "--config", cfg, "-f", "var", "--tokenizer", "t.pth", "--labels", "1",
                              "--grid", tmp_path / "g.png"), "--config", str(cfg))
    one_error_line(toy.invoke("sample", "--config", tmp_path / "nope.yaml"), "not found")


def test_pretrain_with_a_bad_model_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth: [3,\n")
    one_error_line(toy.invoke("pretrain", "-f", "var", "--model-config", bad, "--out", tmp_path / "o"),
                   "--model-config", "cannot parse")
    one_error_line(toy.invoke("pretrain", "--config", bad, "-f", "var", "--model-config", bad), "--config")


def test_killed_code_cache_builds_are_cleaned_up_live_ones_kept(tmp_path, var):
    from torch.utils.data import Subset

    from sar_core.data import build_dirs
    from sar_core.data.code_cache import build_code_cache
    from sar_plugins.digits import digits

    out = tmp_path / "cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a build killed mid-write: its process is gone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = build_dirs.HOST
        killed = tmp_path / f".cache.tmp-{host}-{dead.pid}"
        running = tmp_path / f".cache.tmp-{host}-{live.pid}"
        elsewhere = tmp_path / ".cache.tmp-otherhost-1"  # another host's, recently written
        old = tmp_path / ".cache.tmp-2"  # the old name, untouched for two days
        for d in (killed, running, elsewhere, old):
            d.mkdir()
            (d / "codes_00.npy").write_bytes(b"partial")
        two_days = os.path.getmtime(old) - 2 * 86400
        os.utime(old / "codes_00.npy", (two_days, two_days))
        os.utime(old, (two_days, two_days))
        build_code_cache(var, Subset(digits("val", 64), range(2)), None, out)
        assert out.is_dir() and not killed.exists() and not old.exists()
        assert running.is_dir() and elsewhere.is_dir()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".cache.tmp")) == \
            sorted([running.name, elsewhere.name])
    finally:
        live.kill()
        live.wait()


def test_file_mode_reads_the_umask_without_changing_it(monkeypatch):
    if not Path("/proc/self/status").is_file():
        pytest.skip("reading the umask without setting it needs Linux's /proc")
    old = os.umask(0o027)
    try:
        def no_set(mask):
            raise AssertionError("file_mode() changed the process umask")

        monkeypatch.setattr(os, "umask", no_set)
        assert checkpoint_io.file_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_resume_notices_that_the_data_folder_changed(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    toy.use_registry(monkeypatch)
    rng = np.random.default_rng(0)
    data = tmp_path / "imgs"
    for c in ("cat", "dog"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    out = tmp_path / "run"
    r = toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", data, "--batch-size", "2", "--workers", "0",
                   "--steps", "2", "--loggers", "jsonl", "--device", "cpu", "--out", out)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "data.json").read_text())["files"] == 8
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "3")  # unchanged: resumes
    assert r.exit_code == 0, r.output
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(data / "dog" / "new.png")
    before = (out / "metrics.jsonl").read_text()
    line = one_error_line(toy.invoke("train", "--out", out, "--resume", "--steps", "4"),
                          str(data), "changed", "8 files then, 9 now", "--accept-data-change", "--restart")
    assert (out / "metrics.jsonl").read_text() == before  # refused before touching anything
    r = toy.invoke("train", "--out", out, "--resume", "--steps", "4", "--accept-data-change")
    assert r.exit_code == 0 and "--accept-data-change" in r.output, r.output
    assert json.loads((out / "data.json").read_text())["files"] == 9  # the new contents, recorded
    (data / "cat" / "0.png").write_bytes((data / "cat" / "1.png").read_bytes() + b"x")  # same count, other bytes
    one_error_line(toy.invoke("train", "--out", out, "--resume", "--steps", "5"), "file names or sizes differ")
