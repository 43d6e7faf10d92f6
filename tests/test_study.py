"""sar study: config validation, interval statistics, a tiny study end to end, and
`--arm` jobs + `sar study report` reproducing the single-process result exactly."""

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sar_cli.main import app
from sar_core.train.config import ConfigError
from sar_core.study.config import validate_study
from sar_core.study.stats import interval, is_flat, noise, paired_difference, t_critical, verdict
from sar_plugins.studies import preset_names, preset_path

TINY = ["--preset", "demo", "--set", "run.train.steps=1", "--set", "run.train.batch_size=8",
        "--set", "seeds=[0,1]", "--set", "eval.samples_per_class=2", "--set", "eval.noise_seeds=[1000,1001]",
        "--set", "eval.grid_per_class=1", "--set", "eval.gap_batches=1", "--set", "eval.batch_size=20",
        "--set", "eval.reference_split=val"]


def _out(res) -> str:
    return " ".join(res.output.split())  # rich wraps long lines


def _study(**over):
    tree = yaml.safe_load(preset_path("demo").read_text())
    tree.update(over)
    return tree


def test_interval_matches_the_t_table():
    iv = interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == 1.0
    assert iv["high"] - iv["mean"] == pytest.approx(4.303 / math.sqrt(3))
    assert iv["excludes_zero"] is False  # 2 - 2.48 < 0
    assert interval([1.0, 1.5, 2.0])["excludes_zero"] is True
    assert interval([-1.0, 1.0])["excludes_zero"] is False
    assert interval([5.0])["low"] is None and t_critical(100) == 1.96
    d = paired_difference({0: 3.0, 1: 5.0, 2: 9.0}, {0: 1.0, 1: 2.0})
    assert d["seeds"] == [0, 1] and d["mean"] == 2.5
    nz = noise([1.0, 1.2, 0.8])
    assert nz["sd"] == pytest.approx(0.2) and nz["diff_sd"] == pytest.approx(0.2 * math.sqrt(2))
    assert is_flat({"mean": 0.3}, 0.2) and not is_flat({"mean": 0.5}, 0.2) and is_flat({"mean": 1.0}, None) is None


def test_zero_spread_intervals_are_never_called_significant():
    """A quantised metric that came out the same under both seeds (difference +0.015 twice)
    has no interval: undefined, never 'worse', in the words of the console and markdown."""
    from sar_core.study.report import verdict_text

    for values in ([0.015, 0.015], [0.015, 0.015, 0.015], [0.0, 0.0]):
        iv = interval(values)
        assert iv["low"] is None and iv["excludes_zero"] is None and iv["undefined"] == "zero spread"
        assert verdict(iv, True) == "undefined" and verdict(iv, False) == "undefined"
        text = verdict_text(iv, False)
        assert "undefined (zero spread over" in text and "worse" not in text and "excludes" not in text
    one = interval([0.3])
    assert verdict(one, True) == "undefined" and "undefined (1 seed)" in verdict_text(one, True)
    d = paired_difference({0: 0.52, 1: 0.61}, {0: 0.50, 1: 0.59})  # +0.02 on both seeds
    assert d["mean"] == pytest.approx(0.02) and d["low"] is None and verdict(d, True) == "undefined"
    # a spread interval: the verdict words read the same everywhere
    assert verdict(interval([1.0, 1.5, 2.0]), True) == "better" and verdict(interval([1.0, 1.5, 2.0]), False) == "worse"
    assert verdict(interval([-1.0, 1.0]), True) == "inconclusive"
    assert verdict_text(interval([1.0, 1.5, 2.0]), False).endswith("]: worse")


def test_study_validation_names_the_problem():
    validate_study(_study())
    with pytest.raises(ConfigError, match="control arm 'nope'"):
        validate_study(_study(control="nope"))
    with pytest.raises(ConfigError, match="unknown sections"):
        validate_study(_study(arms={"tf": {"rollout": {"name": "none"}}, "x": {"optimiser": {}}}))
    with pytest.raises(ConfigError, match="reserved"):
        validate_study(_study(arms={"tf": {}, "start": {}}))
    with pytest.raises(ConfigError, match="seeds repeat"):
        validate_study(_study(seeds=[0, 0]))


def test_every_preset_validates():
    from sar_core.study.config import load_study

    assert {"student-forcing", "rollout-depth", "rollout-sampling", "gamma-sweep", "infinity-bsc",
            "cross-family", "demo"} <= set(preset_names())
    for name in preset_names():
        study = load_study(preset_path(name))
        assert study.control in study.arms


def test_cli_bad_input_exits_2(tmp_path):
    res = CliRunner().invoke(app, ["study", "--preset", "no-such"])
    assert res.exit_code == 2 and "unknown study preset" in _out(res)
    res = CliRunner().invoke(app, ["study", *TINY, "--set", "control=zzz", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "control arm 'zzz'" in _out(res)
    res = CliRunner().invoke(app, ["study", *TINY, "--arm", "zzz", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--arm 'zzz' is not in the study" in _out(res)
    res = CliRunner().invoke(app, ["study", "report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a study folder" in _out(res)


def test_unregistered_family_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(app, ["study", "--preset", "demo", "--set", "families.var.family=nosuch",
                                   "--out", str(tmp_path / "i")])
    assert res.exit_code == 2 and "adapter 'nosuch' is not registered" in _out(res)


def _numbers(report: dict) -> dict:
    return report["families"]


def test_study_end_to_end_and_arm_jobs_reproduce_it(tmp_path):
    run = CliRunner()
    one = tmp_path / "one"
    res = run.invoke(app, ["study", *TINY, "--out", str(one)])
    assert res.exit_code == 0, res.output
    for name in ("report.md", "report.html", "report.json", "plots/var_gap_and_losses.png",
                 "plots/var_diff_fid.png", "var/start/grid.png", "var/sar/seed0/grid.png",
                 "var/start/maps/all_scales.png", "var/tf/seed0/maps/scale_05.png"):
        assert (one / name).is_file(), name
    for arm in ("tf", "sar"):
        for seed in (0, 1):  # every arm x seed is an ordinary sar train run folder
            folder = one / "var" / arm / f"seed{seed}"
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            assert cfg["model"]["backbone"].endswith("minis/var/backbone.pth") and cfg["train"]["seed"] == seed
            assert (folder / "backbone.pth").is_file() and (folder / "metrics.jsonl").is_file()
    rows = [json.loads(x) for x in (one / "var/sar/seed0/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss_csf"] > 0  # the SAR arm ran a student pass
    report = json.loads((one / "report.json").read_text())
    fam = report["families"]["var"]
    diff = fam["differences"]["fid"]["sar"]
    assert diff["n"] == 2 and (diff["low"] is None or diff["low"] <= diff["mean"] <= diff["high"])
    assert fam["noise"]["fid"]["sd"] > 0 and fam["noise"]["fid"]["n"] == 2
    assert len(fam["arms"]["tf"]["gap"]["mean"]) == 5  # six scales, five transitions
    md = (one / "report.md").read_text()
    assert "paired difference arm - tf" in md and "measurement noise" in md and "NOT YET" not in md
    assert "excludes 0:" not in md and "excludes 0:" not in _out(res)  # the old "excludes 0: no"
    # the header is generated from what ran; the preset's prose is only quoted
    assert md.startswith("# sar study `demo`: tf, sar on 1 family, 2 training seeds")
    assert "`tf`: teacher forcing only; 1 steps at batch 8" in md and "seeds [0, 1]" in md
    assert "> The study file's own description (not checked against what ran): SAR" in md
    assert "3 paired training seeds" not in md.split("> The study file")[0]
    _check_html_pictures(one, fam)
    # the same study as one job per arm / seed, then report
    two = tmp_path / "two"
    for extra in (["--arm", "start"], ["--arm", "tf"]):
        res = run.invoke(app, ["study", *TINY, "--out", str(two), *extra])
        assert res.exit_code == 0, res.output
    res = run.invoke(app, ["study", "report", str(two)])
    assert res.exit_code == 0, res.output
    assert "NOT YET EVALUATED" in (two / "report.md").read_text()  # the sar runs are missing, and said so
    # the rest as parallel local jobs (subprocesses running `--arm sar --seed S`), then the report
    res = run.invoke(app, ["study", *TINY, "--out", str(two), "--jobs", "2"])
    assert res.exit_code == 0, res.output
    assert "var/sar/seed1: started as a job" in _out(res) and "var/tf/seed0: started" not in _out(res)
    assert (two / "var" / "sar" / "seed0.log").is_file()
    assert _numbers(json.loads((two / "report.json").read_text())) == _numbers(report)
    # a finished run is skipped; a folder of another study is refused
    res = run.invoke(app, ["study", *TINY, "--out", str(two), "--arm", "tf", "--seed", "0"])
    assert res.exit_code == 0 and "done already" in _out(res)
    res = run.invoke(app, ["study", *TINY, "--set", "run.optim.lr=0.5", "--out", str(two), "--arm", "tf"])
    assert res.exit_code == 2 and "different study" in _out(res)


def _check_html_pictures(folder, fam):
    """report.html shows every picture at its own size, and the sizes are readable: maps at
    >= 3 px per token and >= 120 px a panel, grids upscaled to >= 96 px a sample, one
    interval panel per metric (not a 1920-px strip)."""
    import re

    from PIL import Image

    from sar_core.evaluate.pictures import MIN_CELL_PX, MIN_MAP_PX

    page = (folder / "report.html").read_text()
    assert "img{max-width:none}" in page and "max-width:260px" not in page and "style='max-width" not in page
    srcs = re.findall(r"<img src='([^']+)'", page)
    sides = [2, 3, 4, 6, 8]  # the VAR miniature's token grids, scales 1..5
    for src in srcs:
        w, h = Image.open(folder / src).size
        if src.endswith("all_scales.png"):
            assert w >= sum(max(MIN_MAP_PX, 3 * s) for s in sides) and h >= MIN_MAP_PX, (src, w, h)
        elif src.endswith("grid.png"):
            assert w >= 10 * MIN_CELL_PX and h >= MIN_CELL_PX, (src, w, h)  # 10 classes a row
        elif "_diff_" in src:
            assert 500 <= w <= 1000 and h >= 150, (src, w, h)
    panels = {src for src in srcs if "_diff_" in src}
    assert panels == {f"plots/var_diff_{k}.png" for k in fam["differences"]}


def test_models_file_replaces_families_with_paths_from_its_folder(tmp_path):
    from sar_core.study.config import load_study, read_families

    (tmp_path / "ck").mkdir()
    models = tmp_path / "models.yaml"
    models.write_text("families:\n  mine: {family: var, tokenizer: ck/vae.pth, backbone: ck/var.pth, data: digits}\n")
    study = load_study(preset_path("student-forcing"), {"run.train.steps": 7}, read_families(models))
    assert list(study.families) == ["mine"] and study.run["train"]["steps"] == 7
    assert study.families["mine"].tokenizer == (tmp_path / "ck" / "vae.pth").resolve()
    res = CliRunner().invoke(app, ["study", "--preset", "gamma-sweep", "--models", str(models), "--print-config"])
    assert res.exit_code == 0 and "mine:" in res.output and "gamma-0.01" in res.output


def test_a_failed_job_does_not_stop_the_others_and_is_named(tmp_path, monkeypatch):
    """--jobs N: a failing run is reported with its exit code and log; the other runs finish
    and keep their results; running again starts only the failed one."""
    import sys

    from sar_core.study import jobs as study_jobs
    from sar_core.study.plan import RunSpec

    specs = [RunSpec("f", "tf", 0), RunSpec("f", "sar", 0), RunSpec("f", "tf", 1)]
    broken = {"sar"}

    def fake_command(out, spec, device):
        done = study_jobs._done(out, spec)
        if spec.arm in broken:
            return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        return [sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(done)!r}); "
                "p.parent.mkdir(parents=True, exist_ok=True); p.write_text('{}')"]

    monkeypatch.setattr(study_jobs, "job_command", fake_command)
    logs: list[str] = []
    with pytest.raises(RuntimeError) as err:
        study_jobs.run_jobs(tmp_path, specs, 2, "cpu", logs.append, poll_s=0.02)
    log_file = tmp_path / "f" / "sar" / "seed0.log"
    assert "f/sar/seed0 (exit 3" in str(err.value) and str(log_file) in str(err.value)
    assert "boom" in log_file.read_text()
    assert (tmp_path / "f/tf/seed0/eval.json").is_file() and (tmp_path / "f/tf/seed1/eval.json").is_file()
    broken.clear()
    logs.clear()
    study_jobs.run_jobs(tmp_path, specs, 2, "cpu", logs.append, poll_s=0.02)
    assert [m for m in logs if "started" in m] == [f"f/sar/seed0: started as a job (log: {log_file})"]
    assert (tmp_path / "f/sar/seed0/eval.json").is_file()


def test_cross_family_preset_runs_every_shipped_miniature(tmp_path):
    """The cross-family preset, shrunk to 1 step and a few samples, end to end on FlexVAR,
    VAR, Infinity (its class stand-in) and Infinity through its text path (no classes: sampled
    on the validation captions, FID against those images): every family's row, tables and
    pictures exist."""
    out = tmp_path / "cf"
    small = ["--set", "run.train.steps=1", "--set", "run.train.batch_size=4", "--set", "seeds=[0,1]",
             "--set", "eval.samples_per_class=2", "--set", "eval.noise_seeds=[1000,1001]",
             "--set", "eval.grid_per_class=1", "--set", "eval.gap_batches=1", "--set", "eval.batch_size=20",
             "--set", "eval.reference_split=val", "--set", "eval.text_samples=20"]
    res = CliRunner().invoke(app, ["study", "--preset", "cross-family", *small, "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["families"]) == {"flexvar", "var", "infinity", "infinity-text"}
    text = report["families"]["infinity-text"]
    assert text["start"]["conditions"] == "validation captions" and text["start"]["samples"] == 20
    start = json.loads((out / "infinity-text/start/eval.json").read_text())
    assert start["standard_error"]["num_images"] == 20 and start["metrics"]["class_acc"] >= 0
    cfg = yaml.safe_load((out / "infinity-text/sar/seed0/config.yaml").read_text())
    assert cfg["data"]["name"] == "digits-text" and "stand_in_classes" not in cfg["model"]["overrides"]
    assert "| FID ↓ |" in (out / "report.md").read_text().split("family `infinity-text`")[1]
    md = (out / "report.md").read_text()
    for label, fam in report["families"].items():
        assert set(fam["arms"]) == {"tf", "sar"} and not fam["missing"], label
        for key in ("fid", "precision", "class_acc", "gap_mean", "val_loss_tf"):
            d = fam["differences"][key]["sar"]
            assert d["n"] == 2 and (d["low"] is None or d["low"] <= d["mean"] <= d["high"]), (label, key)
            assert fam["control_flat"][key] in (True, False), (label, key)
        for name in (f"plots/{label}_gap_and_losses.png", f"{label}/start/grid.png", f"{label}/sar/seed0/grid.png",
                     f"{label}/start/maps/all_scales.png", f"{label}/sar/seed0/maps/all_scales.png"):
            assert (out / name).is_file(), name
        assert f"family `{label}`" in md


def test_grid_comes_from_the_first_sampling_seed_column_c_is_class_c():
    """grid_seed None: no extra sampling; the grid's column c holds the first samples of class c."""
    from types import SimpleNamespace

    from sar_core.study.evaluate import _grid_images

    C, per, grid = 4, 3, 2
    ctx = SimpleNamespace(eval=SimpleNamespace(grid_seed=None, grid_per_class=grid, samples_per_class=per),
                          text=False, num_classes=C)
    cls = torch.arange(C).repeat_interleave(per)                   # class-major, as _sampled_metrics samples
    idx = torch.arange(per).repeat(C)
    sampled = (cls * 10 + idx).float().view(-1, 1, 1, 1).expand(-1, 3, 2, 2)
    out = _grid_images(SimpleNamespace(num_classes=C), ctx, sampled)
    assert out.shape == (grid * C, 3, 2, 2)
    got = out[:, 0, 0, 0].view(grid, C)                            # rows of nrow=C
    assert torch.equal(got, torch.tensor([[0., 10., 20., 30.], [1., 11., 21., 31.]]))


def test_parallel_jobs_start_the_rollout_arms_first():
    from sar_core.study.plan import RunSpec, longest_first
    from sar_core.study.config import load_study

    study = load_study(preset_path("demo"), {})
    runs = [RunSpec("var", arm, s) for arm in ("tf", "sar") for s in (0, 1)]
    assert [(r.arm, r.seed) for r in longest_first(study, runs)] == [("sar", 0), ("sar", 1), ("tf", 0), ("tf", 1)]


#: scale-ladder family label -> (scales, tokens, pixels, depth) it claims (its header, docs/results.md)
LADDER = {"var": (6, 130, 16, 3), "var-large": (8, 374, 24, 6), "flexvar": (6, 130, 16, 3), "flexvar-large": (8, 374, 24, 6),
          "infinity": (5, 121, 16, 3), "infinity-large": (6, 265, 24, 6)}


def test_scale_ladder_rung_2_is_larger_in_model_and_sequence():
    """The scale-ladder preset's second rungs really are the larger miniatures it says: more
    scales, more tokens, more pixels, deeper, more parameters than the same family's rung 1;
    every rung loads from the shipped files with the preset's overrides and samples at its size."""
    from sar_core.evaluate.generation import generate_images, load_adapter
    from sar_core.study.config import load_study

    study = load_study(preset_path("scale-ladder"))
    assert list(study.families) == list(LADDER) and set(study.arms) == {"tf", "sar"}
    cross = load_study(preset_path("cross-family")).to_dict()  # "cross-family's arms and settings, unchanged"
    tree = study.to_dict()
    assert all(tree[k] == cross[k] for k in ("arms", "run", "eval", "seeds", "control"))
    for label in LADDER:  # rung 1 is the cross-family miniature itself, same files and overrides
        if not label.endswith("-large"):
            assert tree["families"][label] == cross["families"][label], label
    rungs = {}
    for label, fam in study.families.items():
        a = load_adapter(fam.family, fam.tokenizer, fam.backbone, device="cpu", overrides=fam.overrides)
        s = a.default_schedule
        params = sum(p.numel() for p in a.backbone.parameters())
        rungs[label] = (len(s), s.total_tokens, a.image_size(s)[0], len(a.transformer_blocks()), params)
        img = generate_images(a, torch.tensor([3]), cfg=1.0, seed=0)
        assert img.shape[-2:] == a.image_size(s), label
    for label, claim in LADDER.items():
        assert rungs[label][:4] == claim, label
        if label.endswith("-large"):
            small = label.removesuffix("-large")
            assert study.families[label].family == study.families[small].family
            assert rungs[label][4] > 1.8 * rungs[small][4], label


def test_study_help_lists_every_preset():
    res = CliRunner().invoke(app, ["study", "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    for name in preset_names():
        assert name in res.output, name
