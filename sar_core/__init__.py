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

_moved.install()  # the flat layout's old module paths stay importable

from sar_core.schedule import Schedule, ScheduleSampler  # noqa: E402
from sar_core.adapter import ScaleWiseAdapter, AdapterConfig, Generation, CheckpointError  # noqa: E402

__all__ = ["Schedule", "ScheduleSampler", "ScaleWiseAdapter", "AdapterConfig", "Generation",
           "CheckpointError", "__version__"]
