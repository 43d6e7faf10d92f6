"""docs/results.md says only what its reports measured: every table in it equals the one
rendered from docs/results/<experiment>/report.json, every interval quoted in its prose is
in one of those tables, every published report stands alone (its pictures beside it) and
comes from its preset (the `paper` preset's experiment of the same name, or a whole preset
such as `scale-ladder`) and is the aggregate of that study's committed record; the README links to it."""

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


def _source(rep: dict) -> tuple[str, str | None]:
    """A published report's preset and experiment: 'paper / gamma-sweep' or 'scale-ladder'."""
    preset, _, experiment = rep["study"]["name"].partition(" / ")
    return preset, experiment or None


def _preset_study(rep: dict):
    from sar_core.study.config import load_study
    from sar_plugins.studies import preset_path

    preset, experiment = _source(rep)
    study = load_study(preset_path(preset))
    return study.experiment(experiment) if experiment else study


def test_published_reports_stand_alone_and_come_from_their_preset():
    for name in _render().experiments():
        folder = ROOT / "docs" / "results" / name
        rep = json.loads((folder / "report.json").read_text())
        preset, experiment = _source(rep)
        assert (experiment or preset) == name  # published under the experiment's (or preset's) own name
        exp = _preset_study(rep)
        assert list(rep["study"]["arms"]) == list(exp.arms) and list(rep["families"]) == list(exp.families)
        assert rep["study"]["arms"] == exp.to_dict()["arms"]  # the same arm settings as the preset
        assert rep["study"]["run"] == exp.to_dict()["run"] and rep["study"]["eval"] == exp.to_dict()["eval"]
        md = (folder / "report.md").read_text()
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
        assert links
        for link in links:
            assert not link.startswith("..") and (folder / link).is_file(), (name, link)


def test_readme_links_the_results():
    readme = (ROOT / "README.md").read_text()
    assert "docs/results.md" in readme


def _record(rep: dict) -> Path:
    """The committed record (``sar study archive``) of the study folder a report came from:
    docs/results/<preset>-study; every report is its aggregate, so each number traces to the
    runs' own eval.json files."""
    return ROOT / "docs" / "results" / f"{_source(rep)[0]}-study"


def _aggregate(rep: dict) -> dict:
    from sar_core.study.plan import read_study
    from sar_core.study.report import aggregate

    record = _record(rep)
    study, experiment = read_study(record), _source(rep)[1]
    return json.loads(json.dumps(aggregate(record, study.experiment(experiment) if experiment else study)))


def test_reports_are_the_aggregates_of_the_archived_runs():
    published = _render().experiments()
    assert published
    for name in published:
        rep = json.loads((ROOT / "docs" / "results" / name / "report.json").read_text())
        assert (_record(rep) / "study.yaml").is_file(), name
        assert _aggregate(rep)["families"] == rep["families"], name
