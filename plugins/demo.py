"""``sar demo``: the shipped ``demo`` study preset (``assets/studies/demo.yaml``).

The demo is a thin use of :mod:`sar_core.study.run`: one family (the embedded VAR
miniature on 16x16 augmented digits, pretrained by ``sar pretrain`` with the command in
``assets/minis/var/pretrain.json``), two arms from the same checkpoint and the same seeds
(``tf``: plain teacher-forcing continuation, the control; ``sar``: stagger-scale rollout
over all scales + hard CSF loss), three paired training seeds, every run evaluated with
the same sampling seeds, and the study report: paired differences with 95% intervals,
the metric's measured noise, whether the control arm stayed flat, exposure-gap curves,
grids and difference maps. Everything runs offline on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MINIS = Path(__file__).parent / "assets" / "minis"   # one folder per family: the shipped miniatures
ASSETS = MINIS / "var"                               # the demo's model


@dataclass
class DemoSettings:
    """The demo's knobs; each becomes a ``--set`` override of the preset (None: the preset's)."""

    out: Path = Path("sar-demo-report")
    steps: Optional[int] = None
    seeds: Optional[tuple[int, ...]] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    gamma: Optional[float] = None
    samples_per_class: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def overrides(self) -> dict:
        pairs = {"run.train.steps": self.steps, "seeds": list(self.seeds) if self.seeds else None,
                 "run.train.batch_size": self.batch_size, "run.optim.lr": self.lr, "run.loss.gamma": self.gamma,
                 "eval.samples_per_class": self.samples_per_class}
        return {**{k: v for k, v in pairs.items() if v is not None}, **self.extra}


def demo_study(s: DemoSettings):
    from sar_core.study.config import load_study
    from sar_plugins.studies import preset_path

    return load_study(preset_path("demo"), s.overrides())


def run_demo(s: DemoSettings, log: Callable[[str], None] = print, advance=None, jobs: int = 2) -> dict:
    """Run the demo study into ``s.out`` (resuming what is there) and return its report;
    ``jobs`` runs train in parallel (one process per core of a 2-core laptop)."""
    from sar_core.study.run import run_study

    return run_study(demo_study(s), s.out, log=log, advance=advance, device="cpu", jobs=jobs)
