"""sar_core: architecture-agnostic Self-Autoregressive Refinement (SAR) post-training.

The core defines scale schedules, the adapter contract model families implement, the
pluggy hook specs, rollouts, losses, the trainer, checkpointing and the conformance kit.
It never names a model family.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sar")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

from sar_core import _moved  # noqa: E402


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or belongs to another family / size.

    Defined here, torch-free, so that the checkpoint-path helpers and the run config (which
    ``sar train --help`` and shell completion read) import no torch; also
    ``sar_core.adapter.CheckpointError``."""


CheckpointError.__module__ = "sar_core.adapter"  # where users have always found it

_moved.install()  # the flat layout's old module paths stay importable

# The public names load on first use (PEP 562), so that importing a torch-free part of the
# package (the run config, the plugin names the CLI completes) does not import torch.
__getattr__ = _moved.names_from({
    "Schedule": "sar_core.schedule", "ScheduleSampler": "sar_core.schedule",
    "ScaleWiseAdapter": "sar_core.adapter", "AdapterConfig": "sar_core.adapter",
    "Generation": "sar_core.adapter",
})

__all__ = ["Schedule", "ScheduleSampler", "ScaleWiseAdapter", "AdapterConfig", "Generation",
           "CheckpointError", "__version__"]
