"""``sar study``: families x arms x seeds from one start checkpoint, evaluated alike.

Layout of a study folder ``DIR``::

    DIR/study.yaml                         the resolved study (every job checks it matches)
    DIR/<family>/code-cache/               training data tokenised once (when cache_codes)
    DIR/<family>/start/eval.json           the start model under every sampling / noise seed
    DIR/<family>/<arm>/seed<S>/            an ordinary ``sar train`` run folder (config.yaml,
                                           metrics.jsonl, checkpoints/, backbone.pth) + eval.json,
                                           grid.png, maps/
    DIR/report.{md,html,json}, DIR/plots/  written by ``sar study report DIR``

Every run folder resumes (``--resume`` semantics: a folder with checkpoints continues from
the newest), runs under torchrun (rank 0 evaluates), and can be its own cluster job
(``--arm NAME --seed S``). A run whose ``eval.json`` exists is done and skipped. Training
and evaluation are deterministic for a fixed device and thread count, so running the arms
as separate jobs reproduces the single-process numbers exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from sar_core.checkpoint_io import atomic_write_text
from sar_core.hookspecs import hookimpl
from sar_core.study.config import START, StudyConfig
from sar_core.study.evaluate import FamilyContext, evaluate_model, evaluate_start, fixed_from
from sar_core.train.checkpointing import exported
from sar_core.study.plan import Log, RunSpec, arm_config, check_registered, longest_first, plan, training_data, write_study_file


# ----------------------------------------------------------------------------- checks


# ----------------------------------------------------------------------------- run configs


# ----------------------------------------------------------------------------- families


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- one run
class RunStopped(RuntimeError):
    """A run ended before its last step: ``status`` is the trainer's (``signalled``: its
    checkpoint is written and the same command continues it; ``nonfinite``, ``interrupted``)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def run_one(study: StudyConfig, out: Path, spec: RunSpec, ctx: Optional[FamilyContext], registry,
            log: Log, advance: Optional[Callable[[int], None]] = None) -> Optional[dict]:
    """Train one arm x seed (resuming if it has checkpoints), then evaluate it on rank 0."""
    from sar_core.train.trainer import Trainer

    folder = spec.folder(out)
    done = folder / "eval.json"
    if done.is_file():
        log(f"{spec.family}/{spec.arm}/seed{spec.seed}: done already ({done})")
        return json.loads(done.read_text())
    cfg = arm_config(study, out, spec)
    log(f"{spec.family}/{spec.arm}/seed{spec.seed}: {cfg.train.steps} steps "
        f"(rollout {cfg.rollout.name}, loss {cfg.loss.name}, gamma {cfg.loss.gamma})"
        + (" resuming" if cfg.resume else ""))
    trainer = Trainer(cfg, registry, log=log)
    plugin = _StepHook(advance) if advance is not None else None
    if plugin is not None:
        registry.pm.register(plugin, name=f"sar-study-{spec.family}-{spec.arm}-{spec.seed}")
    try:
        result = trainer.run()
    finally:
        if plugin is not None:
            registry.pm.unregister(plugin)
    if result.status != "finished":
        raise RunStopped(result.status, f"{spec.family}/{spec.arm}/seed{spec.seed} stopped: {result.status} "
                         f"{result.message}")
    if not trainer.env.is_main:
        return None
    weights = exported(folder, "backbone_ema") or exported(folder, "backbone") or folder / "backbone.pth"
    adapter = ctx.load(weights, cfg.model.overrides)
    maps = study.eval.maps and spec.seed == study.seeds[0]
    res = evaluate_model(adapter, ctx, list(study.eval.sampling_seeds), folder, maps)
    res.update(fixed_from(res))
    res.update({"family": spec.family, "arm": spec.arm, "seed": spec.seed, "steps": result.step})
    atomic_write_text(json.dumps(res, indent=2), done)
    return res


class _StepHook:
    """Run-time plugin forwarding every optimizer step (progress bars)."""

    def __init__(self, advance: Callable[[int], None]):
        self.advance = advance

    @hookimpl
    def on_step_end(self, step: int, metrics: dict) -> None:
        self.advance(1)


# ----------------------------------------------------------------------------- the whole study
def run_study(study: StudyConfig, out: str | Path, *, family: Optional[str] = None, arm: Optional[str] = None,
              seed: Optional[int] = None, registry=None, device: str = "auto", log: Log = print,
              advance: Optional[Callable[[int], None]] = None, jobs: int = 1,
              report: bool = True, experiment: Optional[str] = None) -> Optional[dict]:
    """Run (the selected part of) a study; with nothing selected, also write the report.

    ``arm='start'`` only prepares the families (code cache, start-model evaluation): the
    first job of a study split over a cluster. ``jobs > 1`` runs the training runs as that
    many parallel local processes (:mod:`sar_core.study.jobs`); ``advance(n)`` is called
    with the number of optimizer steps just done. ``experiment`` runs only the runs that
    experiment needs (and the start of its families) and then writes its report."""
    from sar_core.train import distributed as D
    from sar_core.plugins import get_registry

    out = Path(out)
    registry = registry or get_registry()
    check_registered(study, registry)
    rank, world, _ = D.env_world()
    main = rank == 0
    runs = [] if arm == START else plan(study, family, arm, seed, experiment)
    if arm == START and family is not None:
        plan(study, family)
    fams = study.experiments[experiment].families if experiment else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_study_file(study, out)
    starts: list[RunSpec] = []
    for label in study.families:
        if family not in (None, label) or (fams and label not in fams):
            continue
        cache = Path(training_data(study, out, label))
        if world > 1 and study.families[label].cache_codes and not cache.is_dir():
            raise ValueError(f"{cache} is missing: run `sar study FILE --out {out} --arm start` in one "
                             "process before the torchrun jobs")
        ctx = FamilyContext(study, out, label, device, log) if main else None
        if main:
            ctx.ensure_cache()
            if arm in (None, START) and jobs <= 1:
                evaluate_start(ctx, log)
            elif arm in (None, START):
                starts.append(RunSpec(label, START, -1))
        if jobs <= 1:
            for spec in (r for r in runs if r.family == label):
                run_one(study, out, spec, ctx, registry, log, advance)
    failure: Optional[RuntimeError] = None
    if jobs > 1 and main and (runs or starts):
        from sar_core.study.jobs import run_jobs

        try:
            run_jobs(out, starts + longest_first(study, runs), jobs, device, log, advance)
        except RuntimeError as exc:  # the other jobs finished: report what they measured, then fail
            failure = exc
    unnarrowed = report and main and family is None and arm is None and seed is None
    whole = unnarrowed and experiment is None
    if unnarrowed and experiment is not None:
        if failure is not None:
            raise failure
        from sar_core.study.report import write_report

        return write_report(out, experiment)
    if whole and failure is not None and all(_start_done(out, s) for s in starts):
        from sar_core.study.report import write_reports

        write_reports(out)
        log(f"wrote a partial report to {out} (the failed runs are listed as not yet evaluated); "
            "fix the cause and run the same command again: finished runs are kept")
    if failure is not None:
        raise failure
    if whole:
        from sar_core.study.report import write_reports

        return write_reports(out)
    return None


def _start_done(out: Path, spec: RunSpec) -> bool:
    return (out / spec.family / START / "eval.json").is_file()
