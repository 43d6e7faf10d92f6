"""Plugin discovery: built-ins, a throwaway third-party package, and broken plugins."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sar_core.hookspecs import hookimpl
from sar_core.plugins import PluginError, build_registry

SAR = [sys.executable, "-m", "sar_cli.main"]

THIRD_PARTY = textwrap.dedent('''
    from sar_core.hookspecs import hookimpl
    from sar_core.adapter import ScaleWiseAdapter

    class ToyFamily(ScaleWiseAdapter):
        name = "toyfamily"
        from_config = classmethod(lambda cls, c: None)
        load = classmethod(lambda cls, *a, **k: None)
        save = lambda self, *a, **k: None
        default_schedule = property(lambda self: None)
        image_size = lambda self, s: (8, 8)
        num_classes = property(lambda self: 10)
        code_space = property(lambda self: None)
        encode = teacher_inputs = stagger_inputs = decode = generate = (
            lambda self, *a, **k: None)

    @hookimpl
    def register_adapters(register):
        register("toyfamily", ToyFamily)
''')

BROKEN = {
    "raises_plugin": textwrap.dedent('''
        from sar_core.hookspecs import hookimpl
        @hookimpl
        def register_adapters(register):
            raise RuntimeError("boom from raises_plugin")
    '''),
    "malformed_plugin": textwrap.dedent('''
        from sar_core.hookspecs import hookimpl
        @hookimpl
        def register_adapters(register):
            register("notanadapter", object)
    '''),
    "import_error_plugin": "import module_that_does_not_exist_anywhere\n",
}


def _install_fake_dist(root: Path, dist: str, modules: dict[str, str], eps: dict[str, str]) -> None:
    """Write modules plus a .dist-info with entry points: what `pip install` would leave."""
    for name, src in modules.items():
        (root / f"{name}.py").write_text(src)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in eps.items())
    (info / "entry_points.txt").write_text(f"[sar]\n{lines}\n")


def _plugins_json(tmp_path: Path, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tmp_path), **(extra_env or {}))
    out = subprocess.run(SAR + ["plugins", "--json"], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout)


def test_builtins_listed():
    reg = build_registry()
    assert {"var", "flexvar"} <= set(reg.names("adapter"))
    assert {"none", "ssr", "official"} <= set(reg.names("rollout"))
    assert {"hard", "soft", "naive"} <= set(reg.names("loss"))
    rows = {(r["kind"], r["name"]): r for r in reg.rows()}
    assert rows[("rollout", "ssr")]["package"] == "sar"


def test_third_party_entry_point_appears_in_cli(tmp_path):
    _install_fake_dist(tmp_path, "sar_toy_plugin", {"sar_toy_plugin": THIRD_PARTY},
                       {"toyfamily": "sar_toy_plugin"})
    data = _plugins_json(tmp_path)
    rows = {(r["kind"], r["name"]): r for r in data["entries"]}
    assert ("adapter", "toyfamily") in rows
    assert rows[("adapter", "toyfamily")]["package"] == "sar_toy_plugin"
    assert rows[("adapter", "toyfamily")]["plugin"] == "toyfamily"
    assert ("adapter", "var") in rows  # built-ins still there
    assert data["errors"] == []


def test_broken_plugins_are_named_and_isolated(tmp_path):
    eps = {name: name for name in BROKEN}
    eps["toyfamily"] = "sar_toy_plugin"
    _install_fake_dist(tmp_path, "sar_broken_plugins", {**BROKEN, "sar_toy_plugin": THIRD_PARTY}, eps)
    data = _plugins_json(tmp_path)
    errors = "\n".join(data["errors"])
    assert "raises_plugin" in errors and "boom from raises_plugin" in errors
    assert "malformed_plugin" in errors and "not a ScaleWiseAdapter subclass" in errors
    assert "import_error_plugin" in errors and "ModuleNotFoundError" in errors
    names = {(r["kind"], r["name"]) for r in data["entries"]}
    assert ("adapter", "toyfamily") in names and ("adapter", "var") in names
    assert ("adapter", "notanadapter") not in names


def test_table_output_reports_errors(tmp_path):
    _install_fake_dist(tmp_path, "sar_broken", {"raises_plugin": BROKEN["raises_plugin"]},
                       {"raises_plugin": "raises_plugin"})
    env = dict(os.environ, PYTHONPATH=str(tmp_path), COLUMNS="200")
    out = subprocess.run(SAR + ["plugins"], capture_output=True, text=True, env=env, check=True)
    assert "plugin error" in out.stdout and "raises_plugin" in out.stdout
    assert "ssr" in out.stdout


def test_autoload_can_be_disabled(tmp_path):
    _install_fake_dist(tmp_path, "sar_toy_plugin", {"sar_toy_plugin": THIRD_PARTY},
                       {"toyfamily": "sar_toy_plugin"})
    data = _plugins_json(tmp_path, {"SAR_DISABLE_PLUGIN_AUTOLOAD": "1", "SAR_PLUGINS": "core"})
    names = {(r["kind"], r["name"]) for r in data["entries"]}
    assert ("rollout", "ssr") in names
    assert ("adapter", "toyfamily") not in names and ("adapter", "var") not in names


class _Dup:
    __name__ = "dup_plugin"

    @staticmethod
    @hookimpl
    def register_rollouts(register):
        register("ssr", object)


def test_duplicate_and_unknown_names():
    reg = build_registry(extra_plugins=(_Dup(),))
    assert any("already provided" in e and "dup_plugin" in e for e in reg.errors)
    assert reg.get("rollout", "ssr").__name__ == "StaggerScaleRollout"
    with pytest.raises(PluginError, match="no adapter named 'nope'.*available: .*var"):
        reg.get("adapter", "nope")


def test_version_flag():
    out = subprocess.run(SAR + ["--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("sar ")
