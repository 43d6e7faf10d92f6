"""The installed package is a sar plugin: its entry point registers the family, and a
golden case made by the skeleton script passes `sar conformance` (and a wrong one fails)."""

import runpy
from pathlib import Path

import torch
from sar_core.conformance import run_conformance
from sar_core.plugins import build_registry

from sar_template_family import TemplateAdapter

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_golden_case.py"


def test_the_entry_point_registers_the_family():
    registry = build_registry()
    assert registry.get("adapter", "template") is TemplateAdapter


def test_a_golden_case_from_the_script_passes_and_a_wrong_one_fails(tmp_path):
    case = runpy.run_path(str(SCRIPT))["make_case"](tmp_path / "case")
    report = run_conformance(case)
    assert report.passed and report.compared == 3
    recorded = torch.load(case / "case.pt", weights_only=True)
    recorded["tf_logits"] = recorded["tf_logits"] + 1e-3
    torch.save(recorded, case / "case.pt")
    failed = [r.key for r in run_conformance(case).results if r.status == "fail"]
    assert failed == ["tf_logits"]
