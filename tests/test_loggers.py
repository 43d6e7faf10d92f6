"""Issue 11 item 14: loggers are extras, off unless asked, and never silently off; plain
console lines carry elapsed time and ETA; the W&B plugin imports without wandb."""

import io
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from sar_core.train.config import build_config
from sar_core.plugins import PluginError

import toy_adapter as toy


class _Run:
    def __init__(self, out, step=0, total=10, loggers=("jsonl",)):
        self.out_dir = Path(out)
        self.step, self.total_steps = step, total
        self.config = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images"},
                                    "train": {"log_every": 2, "loggers": list(loggers)}, "out": str(out)})
        self.console = None


def test_default_loggers_need_no_extra():
    cfg = build_config({"model": {"family": "toy"}, "data": {"name": "toy-images"}})
    assert cfg.train.loggers == ["console", "jsonl"]


def test_tensorboard_asked_but_missing_fails_with_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from sar_plugins.loggers import TensorBoardLogger

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(PluginError, match=r"pip install 'sar\[tensorboard\]'"):
        TensorBoardLogger(_Run(tmp_path))


def test_wandb_plugin_imports_without_wandb_and_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    import sar_plugins.wandb_logger as W

    with pytest.raises(PluginError, match=r"pip install 'sar\[wandb\]'"):
        W.WandbLogger(_Run(tmp_path))


def test_wandb_logger_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = {"init": [], "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls["init"].append(kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    from sar_plugins.wandb_logger import WandbLogger

    lg = WandbLogger(_Run(tmp_path))
    lg.log(3, {"step": 3, "loss": 1.5, "lr": 1e-4, "bad": float("nan"), "name": "x"})
    lg.close()
    assert calls["log"] == [(3, {"train/loss": 1.5, "train/lr": 1e-4})] and calls["finish"] == 1
    WandbLogger(_Run(tmp_path, step=3))
    first, second = calls["init"]
    assert first["id"] == second["id"] and second["resume"] == "allow"
    assert first["config"]["model"]["family"] == "toy"


def test_console_lines_outside_a_terminal_show_elapsed_and_eta(tmp_path):
    from sar_plugins.loggers import ConsoleLogger

    buf = io.StringIO()
    lg = ConsoleLogger(_Run(tmp_path, step=0, total=10), console=Console(file=buf, force_terminal=False, width=200))
    for step in range(1, 5):
        lg.log(step, {"loss": 1.0})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and all("elapsed 0:00:0" in ln and "eta 0:" in ln for ln in lines), lines


def test_train_cli_with_a_missing_logger_package_exits_2(tmp_path, monkeypatch):
    from sar_cli.main import app

    toy.use_registry(monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)
    r = CliRunner().invoke(app, ["train", "-f", "toy", "--random-tokenizer", "--data", "toy-images", "--batch-size", "4",
                                 "--workers", "0", "--steps", "1", "--loggers", "jsonl,wandb",
                                 "--out", str(tmp_path / "run")])
    assert r.exit_code == 2, r.output
    assert "sar[wandb]" in r.output and "Traceback" not in r.output
