"""Every hook sar calls, in one place.

A plugin is a module or object with functions named like the specs below, decorated
with :data:`hookimpl`. Built-in adapters and plugins are registered exactly like
third-party ones: through the ``sar`` entry-point group of a package's metadata::

    [project.entry-points.sar]
    myfamily = "my_package.sar_plugin"

Registration hooks receive a ``register`` callback; call it once per thing provided::

    from sar_core.hookspecs import hookimpl

    @hookimpl
    def register_adapters(register):
        register("myfamily", MyAdapter)   # a ScaleWiseAdapter subclass

Run-time hooks are called by the trainer on rank 0 and return nothing.
Set ``SAR_DISABLE_PLUGIN_AUTOLOAD=1`` to skip entry-point discovery (then only the
entry points named in ``SAR_PLUGINS=name1,name2`` are loaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pluggy

PROJECT = "sar"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[str, Any], None]


# -- registration ------------------------------------------------------------------------
@hookspec
def register_adapters(register: Register) -> None:
    """Register model families: ``register(name, ScaleWiseAdapter subclass)``."""


@hookspec
def register_rollouts(register: Register) -> None:
    """Register rollout strategies: ``register(name, Rollout subclass)``."""


@hookspec
def register_losses(register: Register) -> None:
    """Register student-forcing losses: ``register(name, callable or class)``."""


@hookspec
def register_schedules(register: Register) -> None:
    """Register training schedule samplers: ``register(name, ScheduleSampler subclass)``."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets: ``register(name, factory(**options) -> torch Dataset)``."""


@hookspec
def register_metrics(register: Register) -> None:
    """Register metrics / feature extractors: ``register(name, factory)``."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register metric loggers: ``register(name, class with log(step, metrics), close())``."""


# -- run time ----------------------------------------------------------------------------
@hookspec
def on_train_start(run: Any) -> None:
    """A training run starts (``run`` exposes ``config``, ``out_dir``, ``step``)."""


@hookspec
def on_step_end(step: int, metrics: dict[str, float]) -> None:
    """An optimizer step finished; ``metrics`` is what metrics.jsonl records."""


@hookspec
def on_checkpoint_saved(path: Path) -> None:
    """A checkpoint was written (atomically) to ``path``."""


@hookspec
def on_train_end(run: Any) -> None:
    """A training run ended (normally, or after the non-finite-loss guard stopped it)."""
