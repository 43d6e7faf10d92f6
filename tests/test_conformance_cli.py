"""The conformance kit through the CLI and the Python API."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.conformance import compare_key, run_conformance

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.parent for p in FIXTURES.glob("*/config.json"))
INPUT_KEYS = {"var": ("images", "labels", "infer_labels"),
              "flexvar": ("images", "labels", "tf_patch_nums", "infer_patch_nums", "infer_labels",
                          "schedule_seeds")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_shipped_case_passes_through_the_api(case):
    report = run_conformance(case)
    assert report.compared > 5
    failed = [(r.key, r.note, r.max_abs) for r in report.results if r.status == "fail"]
    assert not failed


def test_cli_exit_codes(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["conformance", str(FIXTURES / "var")])
    assert ok.exit_code == 0, ok.output
    assert "all 11 keys within tolerance" in ok.output
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / "var", bad)
    case = torch.load(bad / "case.pt", weights_only=True)
    case["tf_logits"] = case["tf_logits"] + 1e-2
    case["gt_idx"][2] = (case["gt_idx"][2] + 1) % 64
    torch.save(case, bad / "case.pt")
    res = runner.invoke(app, ["conformance", str(bad)])
    assert res.exit_code == 1
    assert "2 of 11 keys failed" in res.output
    missing = runner.invoke(app, ["conformance", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "config.json is missing" in missing.output


@pytest.mark.parametrize("family", ["var", "flexvar"])
def test_inputs_only_case_is_computed_and_dumped(tmp_path, family):
    src = FIXTURES / family
    case_dir = tmp_path / family
    shutil.copytree(src, case_dir)
    full = torch.load(src / "case.pt", weights_only=True)
    torch.save({k: full[k] for k in INPUT_KEYS[family]}, case_dir / "case.pt")
    dump = tmp_path / "dump.pt"
    res = CliRunner().invoke(app, ["conformance", str(case_dir), "--dump", str(dump)])
    assert res.exit_code == 0, res.output
    assert "nothing compared" in res.output
    out = torch.load(dump, weights_only=True)
    outputs = set(full) - set(INPUT_KEYS[family]) - {"meta", "format_version", "family"}
    assert outputs <= set(out), outputs - set(out)
    # what was dumped is what upstream recorded
    for key in ("tf_logits", "gt_idx"):
        assert compare_key(key, out[key], full[key]).status == "pass"


def test_compare_rules():
    a = torch.tensor([1, 2, 3])
    assert compare_key("idx", a, a.to(torch.uint8)).status == "pass"
    assert compare_key("idx", a + 1, a).status == "fail"
    x = torch.randn(4, 4)
    assert compare_key("f", x + 5e-5, x).status == "pass"
    assert compare_key("f", x + 5e-3, x).status == "fail"
    assert compare_key("tf_loss", torch.tensor(1.0 + 2e-5), torch.tensor(1.0)).status == "fail"
    assert compare_key("sar_grad_norm", torch.tensor(3.0001), torch.tensor(3.0)).status == "pass"
    assert compare_key("f", torch.zeros(2, 3), torch.zeros(3, 2)).status == "fail"
    assert compare_key("l", [torch.ones(2)], [torch.ones(2), torch.ones(2)]).status == "fail"


def test_family_without_golden_cases_implements_nothing_and_is_told_so(tmp_path):
    from toy_adapter import make_registry, toy_files

    tok, bb = toy_files(tmp_path)
    torch.save({"images": torch.zeros(1, 3, 8, 8)}, tmp_path / "case.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"family": "toy", "files": {"tokenizer": tok.name, "backbone": bb.name}}))
    with pytest.raises(ValueError, match="no golden-case support"):
        run_conformance(tmp_path, registry=make_registry())


def test_near_zero_values_pass_by_the_absolute_term_and_the_report_says_so():
    """A relative error alone misleads near 0: the result names the rule that decided and
    the share of it the worst element used."""
    want = torch.tensor([1e-9, -2e-9, 3.0])
    ok = compare_key("f", want + 5e-5, want)
    assert ok.status == "pass" and ok.max_rel > 1e3          # a huge relative error ...
    assert ok.note == "|a-b| <= 0.0001 + 0.0001*|b|" and 0.4 < ok.used < 0.51   # ... half the allowance
    bad = compare_key("f", want + 3e-4, want)
    assert bad.status == "fail" and bad.used > 1
    loss = compare_key("tf_loss", torch.tensor(1.0 + 5e-6), torch.tensor(1.0))
    assert loss.note == "|a-b| <= 1e-05" and loss.status == "pass"
    assert compare_key("idx", torch.tensor([1]), torch.tensor([1])).used is None
    res = CliRunner().invoke(app, ["conformance", str(FIXTURES / "var")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "used" in res.output and "max rel" not in res.output
    assert "|a-b| <= 0.0001 + 0.0001*|b|" in res.output and "exact match required" in res.output


def test_case_runner_overrides_receive_the_case_folder(tmp_path):
    from sar_adapters.var.adapter import VARAdapter
    from sar_adapters.var.case import VARCaseRunner
    from sar_core.conformance import CaseRunner, load_case_adapter, read_case, runner_overrides

    class Sidecar(VARCaseRunner):   # reads a file beside config.json
        def overrides(self, config, case_dir):
            return json.loads((case_dir / "sidecar.json").read_text())

    class Old(CaseRunner):          # written before the folder was passed: still called
        def overrides(self, config):
            return {"seen": config["family"]}

    case = tmp_path / "case"
    shutil.copytree(FIXTURES / "var", case)
    (case / "sidecar.json").write_text(json.dumps({"num_heads": 2}))
    config, _, d = read_case(case)
    assert runner_overrides(Old(), config, d) == {"seen": "var"}
    assert load_case_adapter(VARAdapter, config, d, Sidecar()).config.num_heads == 2
    (case / "sidecar.json").write_text(json.dumps({"num_heads": 3}))   # 64 wide: heads must divide it
    with pytest.raises(ValueError):
        load_case_adapter(VARAdapter, config, d, Sidecar())
