"""Suite-wide settings.

The models under test are tiny: one CPU thread is as fast as two and avoids thread
oversubscription when a test starts worker processes (gloo ranks, CLI subprocesses)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
