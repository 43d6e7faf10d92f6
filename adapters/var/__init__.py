"""The built-in ``var`` family: FoundationVision/VAR (plugin module, entry point ``var``)."""

from sar_core.hookspecs import hookimpl

from .adapter import VARAdapter
from .config import VARConfig, infer_var_config

__all__ = ["VARAdapter", "VARConfig", "infer_var_config"]


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"adapter": ["var"]}


@hookimpl
def register_adapters(register):
    register("var", VARAdapter)
