"""examples/plugin-template, the documented path of a third-party plugin, on every change:
pip installs it (offline: no index, no build isolation, no dependencies) into a temporary
target, and its own tests pass there (the contract suite, the entry point, a golden case
from its script through ``sar conformance``'s API)."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin-template"


def setuptools_dir() -> str:
    """The site folder of the newest setuptools on sys.path (>= 70.1 builds wheels without
    the ``wheel`` package; the dev extra asks for it, but a venv's bundled 65.x can shadow it)."""
    best = None
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() == "setuptools":
            version = tuple(int(p) for p in dist.version.split(".")[:2])
            if best is None or version > best[0]:
                best = (version, str(dist.locate_file("")))
    assert best and best[0] >= (70, 1), "setuptools >= 70.1 is missing: pip install -e '.[dev]'"
    return best[1]


def test_the_example_plugin_installs_and_passes_its_own_tests(tmp_path):
    src, target = tmp_path / "plugin-template", tmp_path / "site"
    shutil.copytree(TEMPLATE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": setuptools_dir(), "PIP_NO_INPUT": "1"}
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--no-compile", "--disable-pip-version-check", "--target", str(target),
                          str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    (meta,) = target.glob("sar_plugin_template-*.dist-info")
    assert "template = sar_template_family.plugin" in (meta / "entry_points.txt").read_text()
    assert (target / "sar_template_family" / "adapter.py").is_file()

    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env.pop("SAR_DISABLE_PLUGIN_AUTOLOAD", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=src,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
