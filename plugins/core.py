"""The built-in plugin ``core``: sar's own rollouts, losses, datasets and loggers.

It is registered through the ``sar`` entry-point group exactly like a third-party plugin.
"""

from sar_core.hookspecs import hookimpl
from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.rollouts import BUILTIN_ROLLOUTS


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"rollout": ["none", "ssr", "official"], "loss": ["hard", "soft", "naive"],
             "dataset": ["imagefolder", "textimages"], "logger": ["console", "jsonl", "tensorboard"]}


@hookimpl
def register_rollouts(register):
    for name, cls in BUILTIN_ROLLOUTS.items():
        register(name, cls)


@hookimpl
def register_losses(register):
    for name, cls in BUILTIN_LOSSES.items():
        register(name, cls)


@hookimpl
def register_datasets(register):
    from sar_plugins.datasets import BUILTIN_DATASETS
    from sar_plugins.textimages import textimages

    for name, factory in {**BUILTIN_DATASETS, "textimages": textimages}.items():
        register(name, factory)


@hookimpl
def register_loggers(register):
    from sar_plugins.loggers import BUILTIN_LOGGERS

    for name, cls in BUILTIN_LOGGERS.items():
        register(name, cls)
