"""The built-in plugin ``core``: sar's own rollouts and losses (and, below, other built-ins).

It is registered through the ``sar`` entry-point group exactly like a third-party plugin.
"""

from sar_core.hookspecs import hookimpl
from sar_core.losses import BUILTIN_LOSSES
from sar_core.rollouts import BUILTIN_ROLLOUTS


@hookimpl
def register_rollouts(register):
    for name, cls in BUILTIN_ROLLOUTS.items():
        register(name, cls)


@hookimpl
def register_losses(register):
    for name, cls in BUILTIN_LOSSES.items():
        register(name, cls)
