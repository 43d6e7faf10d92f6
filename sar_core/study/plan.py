"""A study's plan: the runs (family x arm x seed), the study file of a study folder, and
the ``sar train`` config of each run. Pure bookkeeping: imports the study config and the
train config, nothing that trains or evaluates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sar_core.checkpoint_io import atomic_write_text
from sar_core.study.config import StudyConfig, merge


Log = Callable[[str], None]


HIGHER_IS_BETTER = {"fid": False, "kid_mean": False, "precision": True, "recall": True, "f_score": True,
                    "isc_mean": True, "class_acc": True, "gap_mean": False, "val_loss_tf": False, "gap_acc": True}


SAMPLED = ("fid", "kid_mean", "precision", "recall", "f_score", "isc_mean", "class_acc")  # depend on sampling seeds


FIXED = ("gap_mean", "val_loss_tf")                                             # deterministic


PER_IMAGE = ("val_loss_tf", "gap_mean", "gap_acc")  # validation metrics ``sar compare`` pairs image by image


@dataclass(frozen=True)
class RunSpec:
    family: str
    arm: str
    seed: int

    def folder(self, out: Path) -> Path:
        return Path(out) / self.family / self.arm / f"seed{self.seed}"


def plan(study: StudyConfig, family: Optional[str] = None, arm: Optional[str] = None,
         seed: Optional[int] = None, experiment: Optional[str] = None) -> list[RunSpec]:
    """The training runs of a study, optionally narrowed to one family / arm / seed /
    experiment.

    Without experiments: every family x arm x seed. With experiments: the runs some
    experiment names, experiment by experiment (then arm, family, seed), each once; a
    family / arm pair no experiment names has no runs. ``experiment`` keeps only the runs
    that experiment's report needs (its arms and the control, on its families)."""
    for value, known, what in ((family, study.families, "family"), (arm, study.arms, "arm")):
        if value is not None and value not in known:
            raise ValueError(f"--{what} '{value}' is not in the study ({', '.join(known)})")
    if seed is not None and seed not in study.seeds:
        raise ValueError(f"--seed {seed} is not one of the study's seeds {study.seeds}")
    if experiment is not None and experiment not in study.experiments:
        known = ", ".join(study.experiments) or "none: it has no experiments"
        raise ValueError(f"--experiment '{experiment}' is not in the study (its experiments: {known})")
    if study.experiments:
        chosen = [study.experiments[experiment]] if experiment else study.experiments.values()
        runs = [RunSpec(f, a, s) for exp in chosen for a in exp.arms
                for f in (exp.families or study.families) for s in study.seeds]
        runs = list(dict.fromkeys(runs))
    else:
        runs = [RunSpec(f, a, s) for f in study.families for a in study.arms for s in study.seeds]
    return [r for r in runs if family in (None, r.family) and arm in (None, r.arm) and seed in (None, r.seed)]


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


#: fields a study may change in a folder that holds runs: they add runs or words, never
#: change a run that exists (``arms`` and ``families`` only by adding entries)
EXTENSIBLE = ("arms", "families", "experiments", "description")


def extends(theirs: dict, mine: dict) -> bool:
    """``mine`` only adds arms, families or experiments (or rewords the description) to
    ``theirs``: every run ``theirs`` planned keeps its exact config, so its folder stays valid."""
    same = all(theirs.get(k) == mine.get(k) for k in set(theirs) | set(mine) if k not in EXTENSIBLE)

    def kept(key: str) -> bool:
        return all((mine.get(key) or {}).get(name) == spec for name, spec in (theirs.get(key) or {}).items())

    return same and kept("arms") and kept("families")


def write_study_file(study: StudyConfig, out: Path) -> None:
    """DIR/study.yaml; a folder holding a different study is refused (jobs must agree),
    unless the new study only adds arms, families or experiments (:func:`extends`): then the file
    is rewritten and the finished runs are kept."""
    import yaml

    path = Path(out) / "study.yaml"
    mine = study.to_dict()
    if path.is_file():
        theirs = yaml.safe_load(path.read_text())
        if theirs == mine:
            return
        if not extends(theirs, mine):
            raise ValueError(f"{path} holds a different study (not only new arms, families or experiments); use another "
                             "--out (or delete the folder)")
    atomic_write_text(yaml.safe_dump(mine, sort_keys=False), path)


def read_study(out: Path) -> StudyConfig:
    import yaml

    from sar_core.study.config import validate_study

    path = Path(out) / "study.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not a study folder (run `sar study FILE --out {out}`)")
    return validate_study(yaml.safe_load(path.read_text()))


def training_data(study: StudyConfig, out: Path, family: str) -> str:
    fam = study.families[family]
    return str(Path(out) / family / "code-cache") if fam.cache_codes else fam.data


def arm_config(study: StudyConfig, out: Path, spec: RunSpec):
    """The ``sar train`` RunConfig of one run: study ``run`` < arm < fixed study facts."""
    from sar_core.train.checkpointing import list_checkpoints
    from sar_core.train.config import build_config

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
    tree["eval"] = {"at_end": False, **tree.get("eval", {})}  # the study evaluates every run itself
    folder = spec.folder(out)
    tree["out"] = str(folder)
    tree["resume"] = bool(list_checkpoints(folder / "checkpoints"))
    return build_config(tree)


def longest_first(study: StudyConfig, runs: list[RunSpec]) -> list[RunSpec]:
    """Runs whose arm rolls out (a second pass per step) before plain TF runs, so parallel
    jobs do not end on one long run while the other cores idle (stable otherwise). A study
    with experiments keeps their order instead (it is the priority: the first experiments'
    reports fill first)."""
    if study.experiments:
        return list(runs)

    def rolls_out(spec: RunSpec) -> bool:
        rollout = merge(study.run, study.arms[spec.arm]).get("rollout", {}) or {}
        return rollout.get("name", "none") not in ("none", None)
    return sorted(runs, key=lambda r: not rolls_out(r))
