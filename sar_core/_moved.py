"""Old module paths of sar_core (before it was split into sub-packages), kept importable.

``import sar_core.rollouts`` (and every other path below) gives the module that now lives
at its new place, the very same module object, so third-party code written against the old
flat layout keeps working. New code imports the new paths (``docs/plugins.md``)."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old dotted path -> new dotted path
MOVED = {f"sar_core.{old}": f"sar_core.{new}" for old, new in {
    "rollouts": "sar.rollouts", "losses": "sar.losses", "sar_step": "sar.step", "prefix_cache": "sar.prefix_cache",
    "sampling": "sar.sampling",
    "trainer": "train.trainer", "config": "train.config", "optim": "train.optim", "ema": "train.ema",
    "checkpointing": "train.checkpointing", "distributed": "train.distributed",
    "activation_ckpt": "train.activation_ckpt", "nonfinite": "train.nonfinite", "runlock": "train.runlock",
    "signals": "train.signals", "resume_check": "train.resume_check", "pretrain": "train.pretrain",
    "builders": "train.builders",
    "code_cache": "data.code_cache", "image_io": "data.image_io", "classes": "data.classes",
    "tokenizer_fit": "data.tokenizer_fit",
    "evaluation": "evaluate.metrics", "eval_inputs": "evaluate.inputs", "generation": "evaluate.generation",
    "diagnostics": "evaluate.diagnostics", "difference_maps": "evaluate.difference_maps",
    "study_config": "study.config", "study_jobs": "study.jobs", "study_report": "study.report",
    "study_stats": "study.stats",
}.items()}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.real = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import machinery stamped the alias's spec on the real module: put its own back
        module.__spec__, module.__loader__ = self.real, self.real.loader


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(MOVED[fullname]))


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


def names_from(where: dict[str, str]):
    """A module ``__getattr__`` (PEP 562) that finds the names a module used to hold in the
    modules that hold them now (``{name: new module path}``), imported on first use."""
    def __getattr__(name: str):
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(name)
    return __getattr__
