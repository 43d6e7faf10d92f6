"""The ``flexvar`` family: FlexVAR (jiaosiyu1999/FlexVAR) with its FlexVAE tokenizer.

Registered through the ``sar`` entry-point group like any third-party plugin: the
adapter ``flexvar`` and the training schedule sampler ``flexvar-random`` (upstream's
random per-step scale schedules).
"""

from sar_core.hookspecs import hookimpl

from .adapter import FlexVARAdapter
from .config import FlexVARConfig
from .schedules import FlexVARRandomSchedule

__all__ = ["FlexVARAdapter", "FlexVARConfig", "FlexVARRandomSchedule"]


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"adapter": ["flexvar"], "schedule": ["flexvar-random"]}


@hookimpl
def register_adapters(register):
    register("flexvar", FlexVARAdapter)


@hookimpl
def register_schedules(register):
    register("flexvar-random", FlexVARRandomSchedule)
