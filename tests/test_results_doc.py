"""docs/results.md says only what its reports measured: every table in it equals the one
rendered from docs/results/<experiment>/report.json, every interval quoted in its prose is
in one of those tables, every published report stands alone (its pictures beside it) and
comes from the `paper` preset's experiment of the same name; the README links to it."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"


def _render():
    spec = importlib.util.spec_from_file_location("results_render", ROOT / "docs" / "results" / "render.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_table_is_rendered_from_its_report():
    render = _render()
    found = render.blocks(DOC.read_text())
    published = render.experiments()
    assert published, "no report published under docs/results/"
    assert sorted(found) == published  # one table per published report, no table without a report
    for name in published:
        assert found[name] == render.table(name), f"docs/results.md table '{name}' differs from its report"


def test_intervals_in_the_prose_are_those_of_the_tables():
    render = _render()
    text = DOC.read_text()
    tables = "".join(render.table(n) for n in render.experiments())
    prose = re.sub(r"<!-- table: .*? -->.*?<!-- /table -->", "", text, flags=re.S)
    quoted = re.findall(r"[+-]\d[\d.e+-]* \[[+-][\d.e+-]+, [+-][\d.e+-]+\]", prose)
    assert quoted, "the prose quotes no measured interval"
    for q in quoted:
        assert q in tables, f"{q!r} is quoted in docs/results.md but is in no report table"


def test_published_reports_stand_alone_and_come_from_the_paper_preset():
    from sar_core.study.config import load_study
    from sar_plugins.studies import preset_path

    paper = load_study(preset_path("paper"))
    for name in _render().experiments():
        folder = ROOT / "docs" / "results" / name
        rep = json.loads((folder / "report.json").read_text())
        exp = paper.experiment(name)
        assert list(rep["study"]["arms"]) == list(exp.arms) and list(rep["families"]) == list(exp.families)
        assert rep["study"]["arms"] == exp.to_dict()["arms"]  # the same arm settings as the preset
        md = (folder / "report.md").read_text()
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
        assert links
        for link in links:
            assert not link.startswith("..") and (folder / link).is_file(), (name, link)


def test_readme_links_the_results():
    readme = (ROOT / "README.md").read_text()
    assert "docs/results.md" in readme


#: the published study folder's record (``sar study archive``): every report below is its
#: aggregate, so each number traces to the runs' own eval.json files
RUNS = ROOT / "docs" / "results" / "paper-study"


def _aggregate(name: str) -> dict:
    from sar_core.study.plan import read_study
    from sar_core.study.report import aggregate

    return json.loads(json.dumps(aggregate(RUNS, read_study(RUNS).experiment(name))))


def test_reports_are_the_aggregates_of_the_archived_runs():
    published = _render().experiments()
    assert published and (RUNS / "study.yaml").is_file()
    for name in published:
        rep = json.loads((ROOT / "docs" / "results" / name / "report.json").read_text())
        assert _aggregate(name)["families"] == rep["families"], name
