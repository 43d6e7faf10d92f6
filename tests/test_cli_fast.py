"""A fast CLI: help and completion import no torch, completion knows registry names without
importing models, and mistyped names get a suggestion. (Timing: benchmarks/cli_startup.py.)"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from sar_core.plugins import KINDS, build_registry, declared_names, read_declared_names, undeclared
from sar_core.train.config import ConfigError, build_config
from sar_cli.main import COMMANDS, app, load_command

#: runs the CLI in a fresh interpreter and reports which heavy modules got imported
PROBE = textwrap.dedent('''
    import json, sys
    from typer.testing import CliRunner
    from sar_cli.main import app
    runs = json.loads(sys.argv[1])
    out = [CliRunner().invoke(app, args).exit_code for args in runs]
    heavy = sorted(m for m in ("torch", "torchvision", "numpy", "sar_adapters", "PIL") if m in sys.modules)
    print(json.dumps({"codes": out, "heavy": heavy}))
''')


def _probe(runs: list[list[str]], env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs)], capture_output=True, text=True,
                         env=dict(os.environ, **(env or {})), check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_torch():
    runs = [["--help"], ["--version"]] + [[name, "--help"] for name in COMMANDS]
    out = _probe(runs)
    assert out["codes"] == [0] * len(runs)
    assert out["heavy"] == [], f"help imported {out['heavy']}"


COMPLETE = textwrap.dedent('''
    import contextlib, io, json, os, sys
    from sar_cli.main import app
    out = []
    for words in json.loads(sys.argv[1]):
        os.environ.update(_SAR_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split(" ")) - 1))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                app(prog_name="sar")
            except SystemExit:
                pass
        out.append(buf.getvalue().split())
    plugins = ("sar_adapters.var", "sar_adapters.flexvar", "sar_plugins.core", "sar_cli_fast_plugin")
    print(json.dumps({"out": out, "heavy": sorted(m for m in ("torch", *plugins) if m in sys.modules)}))
''')


def _complete(cases: dict[str, list[str]], env: dict | None = None) -> None:
    """Bash completion of each ``words`` (the last one incomplete) in one fresh interpreter:
    the expected candidates, and no torch or plugin module imported."""
    res = subprocess.run([sys.executable, "-c", COMPLETE, json.dumps(list(cases))], capture_output=True,
                         text=True, check=True, env=dict(os.environ, **(env or {})))
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert dict(zip(cases, got["out"])) == cases
    assert got["heavy"] == [], f"completion imported {got['heavy']}"


def test_completion_of_registry_names_imports_no_models():
    _complete({
        "sar train -f ": ["flexvar", "infinity", "var"],
        "sar sample -f fl": ["flexvar"],
        "sar train --rollout ": ["none", "official", "ssr"],
        "sar train --csfl s": ["soft"],
        "sar train --data digits": ["digits", "digits-aug", "digits-text"],
        "sar train --set optim.lr": ["optim.lr=", "optim.lr_end=", "optim.lr_schedule="],
        "sar study --preset cross": ["cross-family"],
        "sar tra": ["train"],
    })


def test_declared_names_are_the_registered_ones():
    """The built-in plugins' SAR_NAMES (what completion offers) equal what they register."""
    reg = build_registry()
    assert undeclared(reg) == []
    for kind in KINDS.values():
        assert declared_names(kind) == reg.names(kind), kind


THIRD_PARTY = textwrap.dedent('''
    import torch  # a plugin module may import anything: completion never imports it
    from sar_core.hookspecs import hookimpl

    SAR_NAMES = {"rollout": ["my-rollout"]}

    @hookimpl
    def register_rollouts(register):
        from sar_core.sar.rollouts import NoRollout
        register("my-rollout", NoRollout)
        register("sneaky", NoRollout)
''')


def test_third_party_declared_names_complete_and_undeclared_ones_are_noted(tmp_path, monkeypatch):
    (tmp_path / "sar_cli_fast_plugin.py").write_text(THIRD_PARTY)
    info = tmp_path / "sar_cli_fast_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sar_cli_fast_plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[sar]\nfastplugin = sar_cli_fast_plugin\n")
    env = {"PYTHONPATH": str(tmp_path)}
    _complete({"sar train --rollout my": ["my-rollout"]}, env)
    assert read_declared_names(tmp_path / "sar_cli_fast_plugin.py") == {"rollout": ["my-rollout"]}
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = build_registry()
    assert {"my-rollout", "sneaky"} <= set(reg.names("rollout"))
    notes = undeclared(reg)
    assert len(notes) == 1 and "fastplugin" in notes[0] and "sneaky" in notes[0]


def test_lazy_commands_keep_their_listed_help():
    for name, (_, short_help) in COMMANDS.items():
        cmd = load_command(name)
        assert cmd.name == name and cmd.short_help == short_help and cmd.callback is not None
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and all(name in r.output for name in COMMANDS)


def test_did_you_mean_for_set_keys_and_families(tmp_path):
    try:
        build_config({"model": {"family": "var"}, "data": {"name": "digits"}}, {"optim.lrr": 1e-5})
    except ConfigError as exc:
        assert "optim.lrr: unknown field; did you mean optim.lr?" in str(exc)
    else:
        raise AssertionError("optim.lrr was accepted")
    r = CliRunner().invoke(app, ["train", "-f", "var", "--data", "digits", "--set", "trian.steps=3",
                                 "--print-config"])
    assert r.exit_code == 2 and "trian: unknown field; did you mean train?" in r.output
    r = CliRunner().invoke(app, ["train", "-f", "vra", "--data", "digits", "--steps", "1", "--tokenizer",
                                 str(tmp_path / "t.pth"), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "no adapter named 'vra' is registered: did you mean 'var'?" in r.output
