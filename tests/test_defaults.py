"""The defaults of `sar train` are the README's recommended settings (its "Defaults of
`sar train`" table), the lr rule follows the global batch and is stated in --help, an
explicit lr wins, a resume keeps the run's lr, and a run prints what it trains with."""

import math
import re
from pathlib import Path

import pytest
import yaml

import toy_adapter as toy
from sar_core.plugins import get_registry
from sar_core.train.builders import build_rollout_and_loss
from sar_core.train.config import LR_RULE, ConfigError, RunConfig, build_config, default_lr, parse_value
from sar_core.train.settings import settings_line
from sar_cli.main import load_command

README = Path(__file__).resolve().parents[1] / "README.md"
BASE = {"model": {"family": "var"}, "data": {"name": "digits"}}


def readme_defaults() -> dict[str, str]:
    """``{dotted field: default}`` from the table under README's "Defaults of `sar train`"."""
    section = README.read_text().split("### Defaults of `sar train`", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.match(r"`([a-z_]+\.[a-z_]+)`", cells[0]) if len(cells) >= 3 else None
        value = re.fullmatch(r"`([^`]+)`", cells[1]) if key else None
        if key and value:
            rows[key.group(1)] = value.group(1)
    return rows


def readme_lr_rule(rows: dict) -> tuple[float, int]:
    rule = re.fullmatch(r"([0-9.e+-]+) \* sqrt\(B / (\d+)\)", rows["optim.lr"])
    assert rule, "README states the lr rule as BASE * sqrt(B / REF)"
    return float(rule.group(1)), int(rule.group(2))


def effective(cfg: RunConfig, dotted: str):
    """The value a run trains with: the config's, or the built rollout's where it leaves it."""
    section, name = dotted.split(".")
    value = getattr(getattr(cfg, section), name)
    if value is None and section == "rollout":
        rollout, _ = build_rollout_and_loss(cfg, get_registry())
        value = getattr(rollout, name)
    return value


def test_readme_table_is_the_pydantic_defaults():
    rows = readme_defaults()
    assert {"optim.lr", "loss.gamma", "rollout.name", "rollout.scales", "loss.name"} <= set(rows), rows
    assert readme_lr_rule(rows) == (1e-4, 768)  # the paper's recipe: 1e-4 at batch 768
    cfg = build_config(BASE)
    for dotted, text in rows.items():
        if dotted != "optim.lr":
            assert effective(cfg, dotted) == yaml.safe_load(text), dotted
    assert cfg.loss.gamma == 0.5 and cfg.rollout.name == "ssr" and cfg.loss.name == "hard"


@pytest.mark.parametrize("batch, lr", [(32, 2.0412e-5), (256, 5.7735e-5)])
def test_lr_follows_the_global_batch(batch, lr):
    base, ref = readme_lr_rule(readme_defaults())
    cfg = build_config(BASE, {"train.batch_size": batch, "train.grad_accum": 2})  # accumulation: same global B
    assert cfg.optim.lr == pytest.approx(base * math.sqrt(batch / ref), rel=1e-12) == default_lr(batch)
    assert cfg.optim.lr == pytest.approx(lr, rel=1e-4)
    assert "lr" not in cfg.optim.model_fields_set  # printed as a default ...
    assert RunConfig.model_validate(cfg.to_dict()).optim.lr == cfg.optim.lr  # ... and stored resolved


def test_an_explicit_lr_wins_and_the_rule_is_in_help():
    assert build_config(BASE, {"optim.lr": 3e-4, "train.batch_size": 256}).optim.lr == 3e-4
    lr = next(p for p in load_command("train").params if p.name == "lr")
    assert LR_RULE in lr.help and LR_RULE in str(lr.show_default)
    gamma = next(p for p in load_command("train").params if p.name == "gamma")
    assert gamma.show_default == "0.5"


def test_constant_schedule_is_checked_against_the_resolved_lr():
    with pytest.raises(ConfigError, match="lr_end needs lr_schedule"):
        build_config(BASE, {"optim.lr_schedule": "constant", "optim.lr_end": 1e-3})
    cfg = build_config(BASE, {"optim.lr_schedule": "constant", "optim.lr_end": default_lr(32)})
    assert cfg.optim.lr == cfg.optim.lr_end


def test_settings_line_marks_what_nobody_set():
    cfg = build_config(BASE, {"loss.gamma": 0.01, "train.batch_size": 64})
    line = settings_line(cfg, "all")
    assert line.startswith(f"settings: lr {default_lr(64):.3g} (default: {LR_RULE} at B = 64), global batch 64,")
    assert "rollout ssr (default) over all scales (default)" in line
    assert line.endswith("CSF loss hard (default), gamma 0.01")
    tf = settings_line(build_config(BASE, {"rollout.name": "none", "optim.lr": 1e-3}))
    assert tf == "settings: lr 0.001, global batch 32 (default), 1000 steps (default), rollout none"


def _train(out, *extra):
    return toy.invoke("train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--workers", "0",
                      "--loggers", "jsonl", "--out", out, *extra)


def test_a_real_run_trains_with_the_readme_defaults_and_a_resume_keeps_its_lr(tmp_path, monkeypatch):
    toy.use_registry(monkeypatch)
    out = tmp_path / "run"
    r = _train(out, "--batch-size", "4", "--steps", "1")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("settings:"))
    assert f"lr {default_lr(4):.3g} (default: {LR_RULE} at B = 4), global batch 4, 1 steps," in line
    assert "rollout ssr (default) over all scales (default)" in line
    assert "CSF loss hard (default), gamma 0.5 (default)" in line
    saved = RunConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    rows = readme_defaults()
    for dotted in set(rows) - {"optim.lr"}:
        assert effective(saved, dotted) == yaml.safe_load(rows[dotted]), dotted
    assert saved.optim.lr == pytest.approx(default_lr(4), rel=1e-12)  # stored resolved
    # a resume at another batch keeps the run's lr (config.yaml), and says so
    r = _train(out, "--resume", "--batch-size", "8", "--steps", "2")
    assert r.exit_code == 0, r.output
    assert "optim.lr stays the run's" in r.output and "train.batch_size changed from 4 to 8" in r.output
    again = yaml.safe_load((out / "config.yaml").read_text())
    assert again["train"]["batch_size"] == 8 and again["optim"]["lr"] == pytest.approx(default_lr(4), rel=1e-12)
    line = next(ln for ln in r.output.splitlines() if ln.startswith("settings:"))
    assert line.startswith(f"settings: lr {default_lr(4):.3g}, global batch 8,")  # the run's, not a default


def test_demo_help_states_the_presets_values():
    """`sar demo --help` says "(preset: X)"; X must be what demo.yaml really runs."""
    from sar_plugins.studies import preset_path

    study = yaml.safe_load(Path(preset_path("demo")).read_text())
    run = study["run"]
    truth = {"steps": run["train"]["steps"], "batch_size": run["train"]["batch_size"], "lr": run["optim"]["lr"],
             "gamma": run["loss"]["gamma"], "seeds": ",".join(map(str, study["seeds"])),
             "samples_per_class": study["eval"]["samples_per_class"]}
    helps = {p.name: p.help for p in load_command("demo").params if p.name in truth}
    assert set(helps) == set(truth)
    for name, value in truth.items():
        said = re.search(r"\(preset: ([0-9.e+-]+(?:,[0-9]+)*)", helps[name]).group(1)
        assert (said if name == "seeds" else parse_value(said)) == value, (name, said, value)


def test_a_study_report_names_sar_trains_defaults_for_what_a_study_leaves_out():
    from sar_core.study.report import _arm_settings

    study = {"run": {"train": {"batch_size": 256}}, "arms": {"sar": {"rollout": {"name": "ssr"}}}}
    assert _arm_settings(study, "sar") == ("`sar`: rollout ssr, CSF loss hard, gamma 0.5; 1000 steps at batch 256, "
                                           f"lr {default_lr(256):.3g}")


def test_every_preset_states_its_lr_and_gamma_so_new_defaults_change_no_study(tmp_path):
    from sar_core.study.config import load_study
    from sar_core.study.plan import arm_config, plan
    from sar_plugins.studies import preset_names, preset_path

    for name in preset_names():
        study = load_study(preset_path(name))
        for spec in plan(study):
            cfg = arm_config(study, tmp_path, spec)
            assert "lr" in cfg.optim.model_fields_set and cfg.optim.lr == 2.0e-5, (name, spec)
            if cfg.rollout.name != "none":
                assert "gamma" in cfg.loss.model_fields_set, (name, spec)
