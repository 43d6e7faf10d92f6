"""docs/python-api.md: every cell runs as written, in order, as a notebook would run them."""

import ast
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def cells() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_cells_are_short():
    found = cells()
    assert len(found) >= 5
    for code in found:
        assert len(ast.parse(code).body) <= 6, code


def test_cells_run_in_order(tmp_path, monkeypatch):
    (tmp_path / "plugins").symlink_to(ROOT / "plugins")   # the cells' paths are relative to the repository root
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for code in cells():
        exec(compile(code, str(DOC), "exec"), ns)
    assert ns["adapter"].name == "var" and ns["adapter"].num_classes == 10
    assert tuple(ns["images"].shape) == (40, 3, 16, 16) and (tmp_path / "samples.png").is_file()
    assert 0 <= ns["report"]["precision"] <= 1 and ns["report"]["fid"] > 0 and "class_accuracy" in ns["report"]
    assert ns["gap"]["num_samples"] == 64 and ns["gap"]["mean_gap_ce"] > 0
    result = ns["result"]
    assert result.status == "finished" and result.step == 5 and (result.out_dir / "backbone.pth").is_file()
    assert result.out_dir == tmp_path / "runs" / "sar-mini"
    # the post-trained backbone is another model than the one the cells started from
    before, after = ns["adapter"].backbone.state_dict(), ns["tuned"].backbone.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
