"""Suite-wide settings.

The models under test are tiny: one CPU thread is as fast as two and avoids thread
oversubscription when a test starts worker processes (gloo ranks, CLI subprocesses)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the eval after the last step (on by default where the data has a val split) costs a toy run
# ~2.5 s of CPU (mostly drawing curves.png and the grid); the suite's ordinary training runs
# skip it, tests/test_periodic_eval.py unsets this to test the default
os.environ.setdefault("SAR_EVAL_AT_END", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def var():
    """The public VAR golden case's model (tiny, random weights)."""
    from sar_adapters.var.adapter import VARAdapter

    return VARAdapter.load(FIXTURES / "var" / "vae_ch32v64z8.pth", FIXTURES / "var" / "var_tiny_d2w64.pth")
