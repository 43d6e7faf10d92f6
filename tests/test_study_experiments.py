"""Studies with named experiments: one study folder whose experiments share the control
runs, run experiment by experiment, each reported on its own; a study folder that grows by
new arms keeps its finished runs; a report published with its pictures beside it."""

import json
import re

import pytest
import yaml
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.study.config import validate_study
from sar_core.study.plan import RunSpec, extends, plan
from sar_core.train.config import ConfigError
from sar_plugins.studies import preset_path

SMALL = {"run.train.steps": 1, "run.train.batch_size": 8, "seeds": [0, 1], "eval.samples_per_class": 2,
         "eval.noise_seeds": [1000, 1001], "eval.grid_per_class": 1, "eval.gap_batches": 1, "eval.batch_size": 20,
         "eval.reference_split": "val"}


def _tree(arms=None, experiments=None) -> dict:
    from sar_core.study.config import load_study

    tree = load_study(preset_path("demo"), SMALL).to_dict()  # absolute checkpoint paths
    if arms:
        tree["arms"].update(arms)
    tree["experiments"] = experiments or {}
    return tree


def test_experiments_name_known_arms_and_families_and_include_the_control():
    study = validate_study(_tree({"last": {"rollout": {"name": "ssr", "scales": "last"}}},
                                 {"a": {"arms": ["sar"]}, "b": {"arms": ["last", "sar"], "families": ["var"]}}))
    assert study.experiments["a"].arms == ["tf", "sar"]
    sub = study.experiment("b")
    assert list(sub.arms) == ["tf", "last", "sar"] and list(sub.families) == ["var"] and not sub.experiments
    with pytest.raises(ConfigError, match="experiment 'x': unknown arm \\['nope'\\]"):
        validate_study(_tree(experiments={"x": {"arms": ["nope"]}}))
    with pytest.raises(ConfigError, match="unknown family"):
        validate_study(_tree(experiments={"x": {"arms": ["sar"], "families": ["flexvar"]}}))
    with pytest.raises(ValueError, match="experiment 'zz' is not in the study"):
        study.experiment("zz")


def test_with_experiments_only_their_runs_are_planned_in_their_order():
    tree = _tree({"last": {"rollout": {"name": "ssr", "scales": "last"}}}, {"b": {"arms": ["last"]}, "a": {"arms": ["sar"]}})
    tree["families"]["other"] = dict(tree["families"]["var"])
    tree["experiments"]["b"]["families"] = ["other"]
    runs = plan(validate_study(tree))
    # experiment b first (control, then its arm) on its family only, then a on every family; each run once
    assert runs[:4] == [RunSpec("other", "tf", 0), RunSpec("other", "tf", 1), RunSpec("other", "last", 0),
                        RunSpec("other", "last", 1)]
    assert RunSpec("var", "last", 0) not in runs and len(runs) == len(set(runs)) == 4 + 2 + 4
    assert runs[4:6] == [RunSpec("var", "tf", 0), RunSpec("var", "tf", 1)]


def test_one_experiment_plans_only_the_runs_its_report_needs():
    tree = _tree({"last": {"rollout": {"name": "ssr", "scales": "last"}}}, {"b": {"arms": ["last"]}, "a": {"arms": ["sar"]}})
    tree["families"]["other"] = dict(tree["families"]["var"])
    tree["experiments"]["b"]["families"] = ["other"]
    study = validate_study(tree)
    assert plan(study, experiment="b") == [RunSpec("other", a, s) for a in ("tf", "last") for s in (0, 1)]
    only_a = plan(study, experiment="a")
    assert {r.arm for r in only_a} == {"tf", "sar"} and {r.family for r in only_a} == {"var", "other"}
    assert set(only_a) | set(plan(study, experiment="b")) == set(plan(study))
    assert plan(study, family="var", arm="sar", experiment="a") == [RunSpec("var", "sar", 0), RunSpec("var", "sar", 1)]
    with pytest.raises(ValueError, match="--experiment 'zz' is not in the study"):
        plan(study, experiment="zz")


def test_a_study_may_grow_by_arms_but_never_change_a_run():
    old = _tree()
    grown = _tree({"last": {"rollout": {"name": "ssr", "scales": "last"}}}, {"a": {"arms": ["last"]}})
    assert extends(old, grown) and not extends(grown, old)  # dropping an arm is not growing
    changed = _tree()
    changed["arms"]["sar"] = {"rollout": {"name": "ssr", "scales": "last"}}
    assert not extends(old, changed)
    reseeded = _tree()
    reseeded["seeds"] = [0, 1, 2]
    assert not extends(old, reseeded)


def test_a_study_may_grow_by_families_but_never_change_one():
    old = _tree()
    grown = _tree()
    grown["families"]["other"] = dict(grown["families"]["var"], backbone="other.pth")
    assert extends(old, grown) and not extends(grown, old)  # dropping a family is not growing
    moved = _tree()
    moved["families"]["var"] = dict(moved["families"]["var"], backbone="other.pth")
    assert not extends(old, moved)


def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_grown_study_keeps_its_runs_and_reports_each_experiment(tmp_path):
    run = CliRunner()
    out = tmp_path / "study"
    first = tmp_path / "first.yaml"
    first.write_text(yaml.safe_dump(_tree(experiments={"main": {"arms": ["sar"]}})))
    res = run.invoke(app, ["study", str(first), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "experiments" / "main" / "report.md").is_file()
    # grow: a new arm in a new experiment; the finished runs are skipped, only the new one trains
    grown = tmp_path / "grown.yaml"
    grown.write_text(yaml.safe_dump(_tree({"last": {"rollout": {"name": "ssr", "scales": "last"}}},
                                          {"main": {"arms": ["sar"]}, "depth": {"arms": ["last"]}})))
    # only the new experiment's runs (--experiment), then its report; the other runs are not touched
    res = run.invoke(app, ["study", str(grown), "--out", str(out), "--experiment", "depth"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "var/tf/seed0: done already" in text and "var/sar/" not in text
    assert "experiments/depth/report.md" in "".join(res.output.split())
    assert (out / "var" / "last" / "seed1" / "eval.json").is_file()
    res = run.invoke(app, ["study", "report", str(out)])
    assert res.exit_code == 0, res.output
    whole = json.loads((out / "report.json").read_text())["families"]["var"]
    depth = json.loads((out / "experiments" / "depth" / "report.json").read_text())
    assert list(depth["study"]["arms"]) == ["tf", "last"] and list(depth["families"]["var"]["arms"]) == ["tf", "last"]
    assert depth["families"]["var"]["differences"]["fid"]["last"] == whole["differences"]["fid"]["last"]
    md = (out / "experiments" / "depth" / "report.md").read_text()
    assert "`sar`" not in md and md.startswith("# sar study `demo / depth`: tf, last")
    for link in _links(md):  # pictures of the run folders linked relative to the experiment's folder
        assert (out / "experiments" / "depth" / link).is_file(), link
    # changing a run that exists is still refused
    changed = _tree({"last": {"rollout": {"name": "ssr", "scales": "all"}}}, {"depth": {"arms": ["last"]}})
    bad = tmp_path / "changed.yaml"
    bad.write_text(yaml.safe_dump(changed))
    res = run.invoke(app, ["study", str(bad), "--out", str(out)])
    assert res.exit_code == 2 and "different study" in " ".join(res.output.split())
    # publish one experiment: the report with its pictures copied beside it
    pub = tmp_path / "published"
    res = run.invoke(app, ["study", "report", str(out), "--experiment", "depth", "--into", str(pub)])
    assert res.exit_code == 0, res.output
    md = (pub / "report.md").read_text()
    links = _links(md)
    assert links and all((pub / link).is_file() for link in links)
    assert not any(link.startswith("..") for link in links)
    assert any(link.startswith("pictures/var/last/seed0/") for link in links)
    assert json.loads((pub / "report.json").read_text())["families"] == depth["families"]
    # a lighter published copy: plots and maps, no sample grids (and no link to one)
    light = tmp_path / "light"
    res = run.invoke(app, ["study", "report", str(out), "--experiment", "depth", "--into", str(light), "--no-grids"])
    assert res.exit_code == 0, res.output
    md = (light / "report.md").read_text()
    assert not list(light.rglob("grid.png")) and "grid.png)" not in md and "not published with this report" in md
    assert all((light / link).is_file() for link in _links(md)) and any("maps" in link for link in _links(md))
    # the record without weights: a study folder that reports the same numbers and continues
    arch = tmp_path / "archive"
    res = run.invoke(app, ["study", "archive", str(out), "--into", str(arch)])
    assert res.exit_code == 0, res.output
    assert "archived 6 evaluated runs and 1 start models" in " ".join(res.output.split())
    kept = [p for p in arch.rglob("*") if p.is_file()]
    assert not [p for p in kept if p.suffix in (".pt", ".pth", ".safetensors") or p.name == "grid.png"]
    assert (arch / "var" / "last" / "seed0" / "maps" / "all_scales.png").is_file()
    assert not (arch / "var" / "last" / "seed1" / "maps").exists()  # the reports show the first seed's
    again = tmp_path / "again"
    res = run.invoke(app, ["study", "report", str(arch), "--experiment", "depth", "--into", str(again), "--no-grids"])
    assert res.exit_code == 0, res.output
    assert json.loads((again / "report.json").read_text())["families"] == depth["families"]
    assert all((again / link).is_file() for link in _links((again / "report.md").read_text()))
    res = run.invoke(app, ["study", str(grown), "--out", str(arch), "--experiment", "depth"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert text.count("done already") == 4 and "steps (rollout" not in text
    res = run.invoke(app, ["study", "archive", str(out), "--into", str(out)])
    assert res.exit_code == 2 and "is the study folder itself" in " ".join(res.output.split())
