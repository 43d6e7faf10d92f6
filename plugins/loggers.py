"""Built-in metric loggers of ``sar train`` (registered by the ``core`` plugin).

A logger is a class registered through ``register_loggers``. The trainer builds the ones
named in ``train.loggers`` on rank 0 as ``cls(run)``, where ``run`` exposes ``out_dir``,
``config`` (the resolved RunConfig), ``step`` (the step the run starts from) and
``total_steps``; it then calls ``log(step, metrics)`` after every optimizer step and
``close()`` at the end. Default loggers: ``console`` and ``jsonl``. A logger whose
optional package is missing fails the run at once with one line naming the extra to
install (:func:`missing_extra`); it is never silently off.

* ``console``: a rich progress bar with loss, TF vs CSF loss and throughput (plain lines
  every ``train.log_every`` steps, with elapsed time and ETA, when the output is not a
  terminal);
* ``jsonl``: ``<out>/metrics.jsonl``, one JSON object per step (non-finite values as
  null); on resume, lines of steps after the resumed step are dropped first;
* ``tensorboard``: event files under ``<out>/tensorboard`` (``pip install 'sar[tensorboard]'``).

The W&B logger is its own plugin, :mod:`sar_plugins.wandb_logger` (``sar[wandb]``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sar_core.checkpoint_io import atomic_write_text


def missing_extra(logger: str, package: str, extra: str):
    """The error of a logger whose optional package is not installed (one line, exit 2)."""
    from sar_core.plugins import PluginError

    return PluginError(f"logger '{logger}' needs the {package} package: pip install 'sar[{extra}]' "
                       f"(or drop '{logger}' from --loggers)")


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "nan"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class JsonlLogger:
    """Appends one JSON object per optimizer step to ``metrics.jsonl``."""

    def __init__(self, run: Any):
        self.path = Path(run.out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(int(run.step))
        self.fh = open(self.path, "a", buffering=1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                keep.append(line)
        atomic_write_text("".join(k + "\n" for k in keep), self.path)

    def log(self, step: int, metrics: dict) -> None:
        rec = {"step": step, **{k: _clean(v) for k, v in metrics.items() if k != "step"}}
        self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        self.fh.close()


class ConsoleLogger:
    """Progress bar (terminal) or periodic lines (logs, CI)."""

    def __init__(self, run: Any, console: Console | None = None):
        self.console = console or run.console or Console()
        self.every = int(run.config.train.log_every)
        self.total = int(run.total_steps)
        self.live = self.console.is_terminal
        self.start_step, self.t0 = int(run.step), time.monotonic()
        self.progress = None
        if self.live:
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                     TimeRemainingColumn(), console=self.console)
            self.task = self.progress.add_task("train", total=self.total, completed=int(run.step), stats="")
            self.progress.start()

    def _stats(self, m: dict) -> str:
        return (f"loss {_fmt(m.get('loss'))}  tf {_fmt(m.get('loss_tf'))}  csf {_fmt(m.get('loss_csf'))}  "
                f"lr {_fmt(m.get('lr'))}  |g| {_fmt(m.get('grad_norm'))}  {_fmt(m.get('images_per_s'))} img/s")

    def log(self, step: int, metrics: dict) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=self._stats(metrics))
        elif step % self.every == 0 or step == self.total:
            self.console.print(f"step {step}/{self.total}  {self._stats(metrics)}  {self._clock(step)}",
                               highlight=False)

    def _clock(self, step: int) -> str:
        elapsed = time.monotonic() - self.t0
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return f"elapsed {_hms(elapsed)}  eta {_hms(eta) if math.isfinite(eta) else '?'}"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class TensorBoardLogger:
    """Scalars under ``<out>/tensorboard``; needs the ``tensorboard`` package (extra)."""

    def __init__(self, run: Any):
        if importlib.util.find_spec("tensorboard") is None:
            raise missing_extra("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run.out_dir) / "tensorboard"), purge_step=int(run.step) + 1)

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


BUILTIN_LOGGERS = {"console": ConsoleLogger, "jsonl": JsonlLogger, "tensorboard": TensorBoardLogger}
