"""The ``infinity`` family: Infinity (FoundationVision/Infinity) with its BSQ-VAE tokenizer.

Bitwise codes, text conditions (pre-computed T5 features, e.g. the ``textimages`` dataset
of the ``core`` plugin), non-square template schedules, and Bitwise Self-Correction as a
training option. Registered through the
``sar`` entry-point group like any third-party plugin.
"""

from sar_core.hookspecs import hookimpl

from .adapter import InfinityAdapter
from .config import InfinityConfig

__all__ = ["InfinityAdapter", "InfinityConfig"]


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"adapter": ["infinity"]}


@hookimpl
def register_adapters(register):
    register("infinity", InfinityAdapter)

