"""The whole suite: every check class together. Subclass it as ``Test<Family>``."""

from __future__ import annotations

from sar_core.testing.checks_blocks import BlockChecks
from sar_core.testing.checks_deep import DeepRolloutChecks
from sar_core.testing.checks_inputs import InputChecks
from sar_core.testing.checks_model import ModelChecks
from sar_core.testing.checks_payloads import PayloadChecks
from sar_core.testing.checks_step import StepChecks


class AdapterContractTests(BlockChecks, InputChecks, ModelChecks, PayloadChecks, StepChecks, DeepRolloutChecks):
    """Subclass as ``Test<Family>`` and implement :meth:`make_adapter`. See :mod:`sar_core.testing`."""
