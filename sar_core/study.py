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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from einops import rearrange

from sar_core.checkpoint_io import atomic_write_text
from sar_core.hookspecs import hookimpl
from sar_core.study_config import START, StudyConfig, merge

Log = Callable[[str], None]
HIGHER_IS_BETTER = {"fid": False, "kid_mean": False, "precision": True, "recall": True, "isc_mean": True,
                    "class_acc": True, "gap_mean": False, "val_loss_tf": False}
SAMPLED = ("fid", "kid_mean", "precision", "recall", "isc_mean", "class_acc")  # depend on sampling seeds
FIXED = ("gap_mean", "val_loss_tf")                                             # deterministic


@dataclass(frozen=True)
class RunSpec:
    family: str
    arm: str
    seed: int

    def folder(self, out: Path) -> Path:
        return Path(out) / self.family / self.arm / f"seed{self.seed}"


def plan(study: StudyConfig, family: Optional[str] = None, arm: Optional[str] = None,
         seed: Optional[int] = None) -> list[RunSpec]:
    """The training runs of a study, optionally narrowed to one family / arm / seed."""
    for value, known, what in ((family, study.families, "family"), (arm, study.arms, "arm")):
        if value is not None and value not in known:
            raise ValueError(f"--{what} '{value}' is not in the study ({', '.join(known)})")
    if seed is not None and seed not in study.seeds:
        raise ValueError(f"--seed {seed} is not one of the study's seeds {study.seeds}")
    return [RunSpec(f, a, s) for f in study.families for a in study.arms for s in study.seeds
            if (family in (None, f)) and (arm in (None, a)) and (seed in (None, s))]


# ----------------------------------------------------------------------------- checks
def check_registered(study: StudyConfig, registry) -> None:
    """Every family, rollout, loss and feature extractor the study names is registered."""
    def need(kind: str, name: str, where: str) -> None:
        if name not in registry.names(kind):
            known = ", ".join(registry.names(kind)) or "none"
            raise ValueError(f"{where}: {kind} '{name}' is not registered (known: {known}); install the "
                             "plugin that provides it or edit the study")

    for label, fam in study.families.items():
        need("adapter", fam.family, f"family '{label}'")
    for arm in study.arms:
        tree = merge(study.run, study.arms[arm])
        need("rollout", tree.get("rollout", {}).get("name", "ssr"), f"arm '{arm}'")
        need("loss", tree.get("loss", {}).get("name", "hard"), f"arm '{arm}'")
    need("metric", study.eval.feature_extractor, "eval")


def write_study_file(study: StudyConfig, out: Path) -> None:
    """DIR/study.yaml; a folder holding a different study is refused (jobs must agree)."""
    import yaml

    path = Path(out) / "study.yaml"
    mine = study.to_dict()
    if path.is_file():
        theirs = yaml.safe_load(path.read_text())
        if theirs != mine:
            raise ValueError(f"{path} holds a different study; use another --out (or delete the folder)")
        return
    atomic_write_text(yaml.safe_dump(mine, sort_keys=False), path)


def read_study(out: Path) -> StudyConfig:
    import yaml

    from sar_core.study_config import validate_study

    path = Path(out) / "study.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not a study folder (run `sar study FILE --out {out}`)")
    return validate_study(yaml.safe_load(path.read_text()))


# ----------------------------------------------------------------------------- run configs
def training_data(study: StudyConfig, out: Path, family: str) -> str:
    fam = study.families[family]
    return str(Path(out) / family / "code-cache") if fam.cache_codes else fam.data


def arm_config(study: StudyConfig, out: Path, spec: RunSpec):
    """The ``sar train`` RunConfig of one run: study ``run`` < arm < fixed study facts."""
    from sar_core.checkpointing import list_checkpoints
    from sar_core.config import build_config

    fam = study.families[spec.family]
    tree = merge(study.run, study.arms[spec.arm])
    model = tree.get("model", {})
    tree["model"] = {**model, "family": fam.family, "tokenizer": fam.tokenizer, "backbone": fam.backbone,
                     "overrides": merge(fam.overrides, model.get("overrides", {}))}
    data = tree.get("data", {})
    tree["data"] = {"workers": 0, **data, "name": training_data(study, out, spec.family),
                    "options": merge(fam.data_options, data.get("options", {})) if not fam.cache_codes else {}}
    tree["train"] = {"save_every": 0, "keep_last": 1, "loggers": ["jsonl"], **tree.get("train", {}),
                     "seed": spec.seed}
    folder = spec.folder(out)
    tree["out"] = str(folder)
    tree["resume"] = bool(list_checkpoints(folder / "checkpoints"))
    return build_config(tree)


# ----------------------------------------------------------------------------- families
class FamilyContext:
    """What every evaluation of one family shares: start model files, val data, metrics."""

    def __init__(self, study: StudyConfig, out: Path, family: str, device: str, log: Log):
        from sar_core.evaluation import get_feature_extractor, open_dataset, reference_set
        from sar_core.generation import load_adapter

        self.study, self.out, self.label, self.log = study, Path(out), family, log
        self.spec = fam = study.families[family]
        self.device = device
        self.start = load_adapter(fam.family, fam.tokenizer, fam.backbone, device=device,
                                  overrides=fam.overrides or None)
        if self.start.num_classes is None:
            raise ValueError(f"family '{family}': sar study evaluates class-conditional models only "
                             f"('{fam.family}' has no classes)")
        self.schedule = self.start.default_schedule
        size = tuple(self.start.image_size(self.schedule))
        self.val = open_dataset(fam.val_data or fam.data, split=fam.val_split, image_size=size,
                                deterministic=True, **fam.data_options)
        e = study.eval
        self.extractor = get_feature_extractor(e.feature_extractor, e.extractor_weights)
        self.reference = reference_set(e.reference, e.reference_split, size)
        self._ref_features: Optional[dict] = None

    def reference_features(self) -> dict:
        """Features of the reference, extracted once per study folder (``<family>/reference_
        features.pt``, keyed by reference, split, extractor, size and metrics) and shared
        by every evaluation and every job process."""
        from sar_core.checkpoint_io import atomic_save
        from sar_core.evaluation import reference_features_for

        if self._ref_features is not None:
            return self._ref_features
        e = self.study.eval
        key = {"reference": str(e.reference), "split": e.reference_split, "extractor": e.feature_extractor,
               "weights": str(e.extractor_weights), "size": list(self.start.image_size(self.schedule)),
               "metrics": sorted(e.metrics), "count": len(self.reference)}
        path = self.out / self.label / "reference_features.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                self._ref_features = saved["features"]
                return self._ref_features
        self._ref_features = reference_features_for(self.reference, self.extractor, e.metrics, self.start.device)
        atomic_save({"key": key, "features": {k: v.cpu() for k, v in self._ref_features.items()}}, path)
        return self._ref_features

    def ensure_cache(self) -> None:
        from sar_core.code_cache import build_code_cache
        from sar_core.data import is_code_cache
        from sar_core.evaluation import open_dataset

        cache = Path(training_data(self.study, self.out, self.label))
        if not self.spec.cache_codes or is_code_cache(cache):
            return
        size = tuple(self.start.image_size(self.schedule))
        train = open_dataset(self.spec.data, "train", size, deterministic=True, **self.spec.data_options)
        self.log(f"{self.label}: tokenising {self.spec.data} once into {cache}")
        build_code_cache(self.start, train, self.schedule, cache)

    def load(self, backbone: Path, overrides: dict):
        from sar_core.generation import load_adapter

        return load_adapter(self.spec.family, self.spec.tokenizer, backbone, device=self.device,
                            overrides=overrides or None)


# ----------------------------------------------------------------------------- evaluation
def _sampled_metrics(adapter, ctx: FamilyContext, seed: int) -> tuple[dict, torch.Tensor]:
    """Metrics of one sampling seed, and its images (class-major: samples_per_class of class 0 first)."""
    from sar_core.evaluation import class_accuracy, compute_metrics
    from sar_core.generation import generate_images

    e = ctx.study.eval
    labels = torch.arange(adapter.num_classes).repeat_interleave(e.samples_per_class)
    images = generate_images(adapter, labels, cfg=e.cfg, top_k=e.top_k, top_p=e.top_p, seed=seed,
                             batch_size=e.batch_size)
    m = compute_metrics(images, ctx.reference, extractor=ctx.extractor, metrics=e.metrics,
                        device=adapter.device, seed=seed, reference_features=ctx.reference_features())
    row = {k: float(m[k]) for k in SAMPLED if k in m}
    if ctx.extractor.classifier is not None:
        row["class_acc"] = class_accuracy(images, labels, ctx.extractor, adapter.device)
    return row, images


def _grid_images(adapter, ctx: FamilyContext, sampled: torch.Tensor) -> torch.Tensor:
    """grid_per_class images of every class, row-major with column c = class c: taken from the
    first sampling seed's images (``grid_seed`` None) or sampled with ``grid_seed``."""
    from sar_core.generation import balanced_labels, generate_images

    e, n_cls = ctx.study.eval, adapter.num_classes
    if e.grid_seed is not None or e.grid_per_class > e.samples_per_class:
        return generate_images(adapter, balanced_labels(e.grid_per_class * n_cls, n_cls), cfg=e.cfg,
                               top_k=e.top_k, top_p=e.top_p, seed=7 if e.grid_seed is None else e.grid_seed,
                               batch_size=e.batch_size)
    per_class = rearrange(sampled, "(c n) ch h w -> n c ch h w", c=n_cls)[:e.grid_per_class]
    return rearrange(per_class, "n c ch h w -> (n c) ch h w")


def _fixed_metrics(adapter, ctx: FamilyContext, maps: bool = False) -> dict:
    """Exposure gap per scale and the validation TF loss (token-weighted TF CE); with
    ``maps`` also the difference maps, from the same passes (under ``"_maps"``)."""
    from sar_core.diagnostics import exposure_gap

    e = ctx.study.eval
    with adapter.inference():
        gap = exposure_gap(adapter, ctx.val, ctx.schedule, e.gap_batches or None, batch_size=e.batch_size,
                           maps=maps)
    counts = ctx.schedule.token_counts
    val = sum(r["tf_ce"] * n for r, n in zip(gap["scales"], counts)) / sum(counts)
    se = gap["standard_error"]
    return {"gap_mean": gap["mean_gap_ce"], "val_loss_tf": val,
            "standard_error": {"gap_mean": se["mean_gap_ce"], "val_loss_tf": se["val_loss_tf"],
                               "num_images": gap["num_samples"]},
            "gap": [r["gap_ce"] for r in gap["scales"][1:]], "gap_acc": [r["gap_acc"] for r in gap["scales"][1:]],
            **({"_maps": {"schedule": gap["schedule"], "num_samples": gap["num_samples"], "maps": gap["maps"]}}
               if maps else {})}


def _pictures(adapter, ctx: FamilyContext, folder: Path, maps: Optional[dict], sampled: torch.Tensor) -> dict:
    """The sample grid and, given the difference-map report of :func:`_fixed_metrics`, its PNGs."""
    from sar_core.difference_maps import save_difference_maps
    from sar_core.generation import save_grid

    n_cls = adapter.num_classes
    images = _grid_images(adapter, ctx, sampled)
    scale = max(1, 64 // images.shape[-1])
    big = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest") if scale > 1 else images
    out = {"grid": str(save_grid(big, folder / "grid.png", nrow=n_cls).relative_to(ctx.out))}
    if maps:
        save_difference_maps(maps, folder / "maps", title=f"{ctx.label} / {folder.name}")
        out["maps"] = str((folder / "maps" / "all_scales.png").relative_to(ctx.out))
        out["map_means"] = [None] + [float(m.mean()) for m in maps["maps"][1:]]
    return out


def evaluate_model(adapter, ctx: FamilyContext, seeds: list[int], folder: Path, maps: bool) -> dict:
    """Metrics under every sampling seed (+ their mean), gap, val loss, grid, maps."""
    per_seed, first = {}, None
    for s in seeds:
        per_seed[str(s)], images = _sampled_metrics(adapter, ctx, s)
        first = images if first is None else first
        del images
    means = {k: sum(r[k] for r in per_seed.values()) / len(per_seed) for k in next(iter(per_seed.values()))}
    fixed = _fixed_metrics(adapter, ctx, maps)
    pictures = _pictures(adapter, ctx, folder, fixed.pop("_maps", None), first)
    return {"per_sampling_seed": per_seed, "metrics": {**means}, **fixed, **pictures}


def evaluate_start(ctx: FamilyContext, log: Log) -> dict:
    path = ctx.out / ctx.label / START / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    e = ctx.study.eval
    seeds = list(dict.fromkeys([*e.sampling_seeds, *e.noise_seeds]))
    log(f"{ctx.label}: evaluating the start model under {len(seeds)} sampling seeds (metric noise)")
    res = evaluate_model(ctx.start, ctx, seeds, path.parent, e.maps)
    res["metrics"] = {k: sum(res["per_sampling_seed"][str(s)][k] for s in e.sampling_seeds) / len(e.sampling_seeds)
                      for k in res["metrics"]}
    res.update(fixed_from(res))
    atomic_write_text(json.dumps(res, indent=2), path)
    return res


def fixed_from(res: dict) -> dict:
    return {"metrics": {**res["metrics"], "gap_mean": res["gap_mean"], "val_loss_tf": res["val_loss_tf"]}}


# ----------------------------------------------------------------------------- one run
def run_one(study: StudyConfig, out: Path, spec: RunSpec, ctx: Optional[FamilyContext], registry,
            log: Log, advance: Optional[Callable[[int], None]] = None) -> Optional[dict]:
    """Train one arm x seed (resuming if it has checkpoints), then evaluate it on rank 0."""
    from sar_core.trainer import Trainer

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
        raise RuntimeError(f"{spec.family}/{spec.arm}/seed{spec.seed} stopped: {result.status} {result.message}")
    if not trainer.env.is_main:
        return None
    ema = folder / "backbone_ema.pth"
    adapter = ctx.load(ema if ema.is_file() else folder / "backbone.pth", cfg.model.overrides)
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
              report: bool = True) -> Optional[dict]:
    """Run (the selected part of) a study; with nothing selected, also write the report.

    ``arm='start'`` only prepares the families (code cache, start-model evaluation): the
    first job of a study split over a cluster. ``jobs > 1`` runs the training runs as that
    many parallel local processes (:mod:`sar_core.study_jobs`); ``advance(n)`` is called
    with the number of optimizer steps just done."""
    from sar_core import distributed as D
    from sar_core.plugins import get_registry

    out = Path(out)
    registry = registry or get_registry()
    check_registered(study, registry)
    rank, world, _ = D.env_world()
    main = rank == 0
    runs = [] if arm == START else plan(study, family, arm, seed)
    if arm == START and family is not None:
        plan(study, family)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_study_file(study, out)
    starts: list[RunSpec] = []
    for label in study.families:
        if family not in (None, label):
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
        from sar_core.study_jobs import run_jobs

        try:
            run_jobs(out, starts + longest_first(study, runs), jobs, device, log, advance)
        except RuntimeError as exc:  # the other jobs finished: report what they measured, then fail
            failure = exc
    whole = report and main and family is None and arm is None and seed is None
    if whole and failure is not None and all(_start_done(out, s) for s in starts):
        from sar_core.study_report import write_report

        write_report(out)
        log(f"wrote a partial report to {out} (the failed runs are listed as not yet evaluated); "
            "fix the cause and run the same command again: finished runs are kept")
    if failure is not None:
        raise failure
    if whole:
        from sar_core.study_report import write_report

        return write_report(out)
    return None


def longest_first(study: StudyConfig, runs: list[RunSpec]) -> list[RunSpec]:
    """Runs whose arm rolls out (a second pass per step) before plain TF runs, so parallel
    jobs do not end on one long run while the other cores idle (stable otherwise)."""
    def rolls_out(spec: RunSpec) -> bool:
        rollout = merge(study.run, study.arms[spec.arm]).get("rollout", {}) or {}
        return rollout.get("name", "none") not in ("none", None)
    return sorted(runs, key=lambda r: not rolls_out(r))


def _start_done(out: Path, spec: RunSpec) -> bool:
    return (out / spec.family / START / "eval.json").is_file()
