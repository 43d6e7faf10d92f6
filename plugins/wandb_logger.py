"""The plugin ``wandb``: a Weights & Biases logger for ``sar train`` (``--loggers ...,wandb``).

Installed with ``pip install 'sar[wandb]'``. This module imports without wandb; asking for
the logger without the package fails the run at once with one line naming the extra.
The W&B run id is kept in ``<out>/wandb_id`` so that ``--resume`` continues the same W&B
run. Project / entity / mode come from W&B's own environment variables (``WANDB_PROJECT``,
default ``sar``; ``WANDB_ENTITY``; ``WANDB_MODE=offline`` to log without network).
"""

from __future__ import annotations

import importlib
import math
import os
import uuid
from pathlib import Path
from typing import Any

from sar_core.hookspecs import hookimpl


class WandbLogger:
    """Scalars of every optimizer step under ``train/<name>``; the run config as W&B config."""

    def __init__(self, run: Any):
        from sar_plugins.loggers import missing_extra

        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            raise missing_extra("wandb", "wandb", "wandb") from None
        out = Path(run.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sar"), id=run_id, resume="allow",
                              dir=str(out), name=out.name, config=run.config.to_dict())

    def log(self, step: int, metrics: dict) -> None:
        values = {f"train/{k}": v for k, v in metrics.items()
                  if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        self.run.log(values, step=int(step))

    def close(self) -> None:
        self.run.finish()


#: what this plugin registers, read without importing it (shell completion; tests check it)
SAR_NAMES = {"logger": ["wandb"]}


@hookimpl
def register_loggers(register):
    register("wandb", WandbLogger)
