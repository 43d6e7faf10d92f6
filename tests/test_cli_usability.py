"""Issue 11 item 13: help with defaults / panels / examples, shell completion, SAR_*
variables with precedence flag > env > config file > default, --config on every model
command, and `sar plugins` listing versions and hooks."""

import json

import pytest
import yaml
from typer.testing import CliRunner

import toy_adapter as toy
from sar_cli.main import app, load_command


def _command(name: str):
    return load_command(name)


def test_train_help_every_flag_has_help_a_panel_and_defaults_are_shown():
    params = [p for p in _command("train").params if p.name != "help"]
    assert all(p.help for p in params), [p.name for p in params if not p.help]
    assert all(getattr(p, "rich_help_panel", None) for p in params)
    assert len({p.rich_help_panel for p in params}) >= 5
    shown = {p.name: p.show_default for p in params}
    assert shown["lr"] == "1e-4 * sqrt(B / 768)" and shown["gamma"] == "0.5" and shown["loggers"] == "console,jsonl"
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Example:" in r.output and "sqrt(B / 768)" in r.output and "SAR_BATCH_SIZE" in r.output


def test_shell_completion_is_on():
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "--install-completion" in r.output


@pytest.mark.parametrize("flag,env,expected", [(None, None, 8), (None, "16", 16), ("4", "16", 4)])
def test_train_precedence_flag_env_config_default(tmp_path, monkeypatch, flag, env, expected):
    toy.use_registry(monkeypatch)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"family": "toy"}, "data": {"name": "toy-images"},
                                   "train": {"batch_size": 8}}))
    args = ["train", "--config", str(cfg), "--print-config"] + (["--batch-size", flag] if flag else [])
    r = CliRunner().invoke(app, args, env={"SAR_BATCH_SIZE": env} if env else {})
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.output)["train"]["batch_size"] == expected
    r = CliRunner().invoke(app, ["train", "-f", "toy", "--data", "toy-images", "--print-config"])
    assert yaml.safe_load(r.output)["train"]["batch_size"] == 32  # the default


@pytest.mark.parametrize("command", ["sample", "eval", "diagnose", "tokenize"])
def test_model_commands_take_config_files_below_env_and_flags(tmp_path, command):
    assert any(p.name == "config" for p in _command(command).params)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"family": "var", "tokenizer": "/from/file.pth"}))
    extra = {"sample": ["--labels", "1", "--grid", str(tmp_path / "g.png"), "--backbone", "/b.pth"],
             "eval": ["--reference", "digits", "--feature-extractor", "digit-classifier", "--backbone", "/b.pth"],
             "diagnose": ["--data", "digits", "--backbone", "/b.pth"],
             "tokenize": ["--data", "digits", "--out", str(tmp_path / "c")]}[command]
    run = lambda *a, env=None: CliRunner().invoke(app, [command, "--config", str(cfg), *extra, *a], env=env or {})
    r = run()
    assert r.exit_code == 2 and "/from/file.pth" in r.output, r.output
    r = run(env={"SAR_TOKENIZER": "/from/env.pth"})
    assert r.exit_code == 2 and "/from/env.pth" in r.output, r.output
    r = run("--tokenizer", "/from/flag.pth", env={"SAR_TOKENIZER": "/from/env.pth"})
    assert r.exit_code == 2 and "/from/flag.pth" in r.output, r.output
    cfg.write_text(yaml.safe_dump({"famliy": "var"}))
    r = run()
    assert r.exit_code == 2 and "famliy" in r.output


def test_consistent_names_across_commands():
    for name in ("eval", "tokenize", "diagnose"):
        outs = [p for p in _command(name).params if p.name == "out"]
        assert outs and "-o" in outs[0].opts, name
    eval_opts = {o for p in _command("eval").params for o in p.opts}
    assert {"--feature-weights", "--split", "--config"} <= eval_opts


def test_plugins_lists_versions_and_hooks():
    r = CliRunner().invoke(app, ["plugins", "--json"])
    data = json.loads(r.output)
    rows = {p["plugin"]: p for p in data["plugins"]}
    assert rows["var"]["version"] == "0.1.0" and rows["var"]["hooks"] == ["register_adapters"]
    assert "register_loggers" in rows["wandb"]["hooks"]


@pytest.mark.parametrize("command", ["sample", "eval", "diagnose", "tokenize", "plugins", "pretrain", "demo"])
def test_every_flag_of_the_model_commands_has_help(command):
    params = [p for p in _command(command).params if p.name != "help"]
    assert all(p.help for p in params), [p.name for p in params if not p.help]


@pytest.mark.parametrize("command", ["train", "sample", "eval", "diagnose", "tokenize", "pretrain", "demo"])
def test_config_everywhere(command):
    assert "--config" in {o for p in _command(command).params for o in p.opts}
