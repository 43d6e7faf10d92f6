"""The config of ``sar study``: families x arms x seeds, one pydantic model.

A study file (YAML) names the start checkpoint of every family, the arms (each a partial
``sar train`` run config merged over the study-wide ``run`` section), the training seeds
and how every arm is evaluated::

    name: student-forcing
    control: tf                        # the arm every other arm is compared with
    seeds: [0, 1, 2]                   # training seeds, paired across arms
    families:
      my-var:                          # a label; `family` is the registered adapter
        family: var
        tokenizer: vae.pth             # relative paths: from the study file's folder
        backbone: var_d16.pth
        data: /data/train              # dataset name, image folder or code cache
    run:                               # every arm: sections of the sar train config
      optim: {lr: 2.9e-5}              # sar train's default at batch 64, 1e-4 * sqrt(64 / 768)
      train: {steps: 1000, batch_size: 64}
    arms:
      tf:  {rollout: {name: none}}
      sar: {rollout: {name: ssr, scales: all}, loss: {name: hard}}
    eval: {samples_per_class: 50, feature_extractor: inception, reference: /data/val}

Every arm of a family starts from the same checkpoint files. Validation of registry names
(families, rollouts, losses, datasets) happens when the study runs, so a preset may name
a family that a plugin registers later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sar_core.checkpoint_io import hub
from sar_core.checkpoint_io.hub import CheckpointRef
from sar_core.train.config import ConfigError, format_validation_error, read_config_file, set_path

START = "start"  # the reserved arm name of the start checkpoint's own evaluation


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FamilySpec(_Section):
    family: str = Field(description="registered adapter name (see `sar plugins`)")
    tokenizer: Optional[CheckpointRef] = Field(None, description="tokenizer checkpoint every arm starts from "
                                               "(a file, or hf://OWNER/REPO/FILE[@REVISION])")
    backbone: Optional[CheckpointRef] = Field(None, description="backbone checkpoint every arm starts from")
    overrides: dict[str, Any] = Field(default_factory=dict, description="adapter config overrides")
    data: str = Field(description="training data: registered dataset, image folder or code cache")
    val_data: Optional[str] = Field(None, description="data of the exposure gap / maps (default: data)")
    val_split: str = Field("val", description="split of val_data")
    cache_codes: bool = Field(True, description="tokenise the training data once into a code cache "
                              "shared by all arms (off for augmenting datasets)")
    data_options: dict[str, Any] = Field(default_factory=dict, description="dataset factory options")


class EvalSpec(_Section):
    samples_per_class: int = Field(50, ge=2, description="samples per class of every evaluation "
                                   "(class-conditional models)")
    text_samples: Optional[int] = Field(None, ge=2, description="samples of every evaluation of a model "
                                        "without classes (text-conditioned): one per validation caption, in "
                                        "order, cycled; None: one per validation image")
    sampling_seeds: list[int] = Field(default_factory=lambda: [1000], min_length=1,
                                      description="sampling seeds of every arm run (same for all arms); "
                                      "metrics are averaged over them")
    noise_seeds: list[int] = Field(default_factory=lambda: [1000, 1001, 1002, 1003], min_length=2,
                                   description="sampling seeds the start model is evaluated with to "
                                   "measure the metric's own noise")
    cfg: float = Field(1.0, ge=0, description="guidance scale of the evaluation samples")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0, le=1)
    feature_extractor: str = Field("inception", description="registered feature extractor")
    extractor_weights: Optional[Path] = None
    reference: Optional[str] = Field(None, description="reference images of class-conditional models: "
                                     "registered dataset or folder; None: the validation images. Models "
                                     "without classes are always compared with the validation images whose "
                                     "captions conditioned their samples")
    reference_split: str = "train"
    metrics: list[str] = Field(default_factory=lambda: ["fid", "prc"])
    gap_batches: int = Field(0, ge=0, description="batches of val data for gap / maps (0: all)")
    batch_size: int = Field(250, gt=0, description="sampling / diagnostics batch size")
    grid_per_class: int = Field(10, ge=1, description="grid samples per class (same labels and seed "
                                "in every arm)")
    grid_seed: Optional[int] = Field(None, description="sampling seed of the grid; None: the first "
                                     "grid_per_class samples of every class of the first sampling seed "
                                     "(no extra sampling; seed 7 when samples_per_class < grid_per_class)")
    maps: bool = Field(True, description="per-scale difference maps of the start model and seed-0 arms")


class ExperimentSpec(_Section):
    """A named part of a study: some of its arms (the control always included) on some of
    its families, reported on its own (``DIR/experiments/<name>/report.md``). Several
    experiments share the control runs and every arm they name in common."""

    arms: list[str] = Field(min_length=1, description="arms compared with the control (in report order)")
    families: Optional[list[str]] = Field(None, description="family labels (default: every family)")
    description: str = ""


class StudyConfig(_Section):
    name: str = "study"
    description: str = ""
    control: str = Field(description="the arm every other arm is compared with")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    families: dict[str, FamilySpec] = Field(min_length=1)
    run: dict[str, Any] = Field(default_factory=dict, description="sar train config sections for every arm")
    arms: dict[str, dict[str, Any]] = Field(min_length=2)
    eval: EvalSpec
    experiments: dict[str, ExperimentSpec] = Field(
        default_factory=dict, description="named parts reported on their own; when given, the study runs "
        "only the runs some experiment names, experiment by experiment (the order is the priority)")

    @model_validator(mode="after")
    def _check(self) -> "StudyConfig":
        if self.control not in self.arms:
            raise ValueError(f"control arm '{self.control}' is not one of the arms ({', '.join(self.arms)})")
        if START in self.arms:
            raise ValueError(f"'{START}' is reserved for the start checkpoint; rename that arm")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        for name in [*self.arms, *self.families]:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"arm / family label {name!r} must be a plain folder name")
        for arm, spec in self.arms.items():
            bad = sorted(set(spec) - {"model", "rollout", "loss", "optim", "train", "data"})
            if bad:
                raise ValueError(f"arm '{arm}': unknown sections {bad} (model, rollout, loss, optim, train, data)")
        for name, exp in self.experiments.items():
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"experiment label {name!r} must be a plain folder name")
            for what, names, known in (("arm", exp.arms, self.arms), ("family", exp.families or [], self.families)):
                unknown = [n for n in names if n not in known]
                if unknown:
                    raise ValueError(f"experiment '{name}': unknown {what} {unknown} (the study's: {', '.join(known)})")
            if self.control not in exp.arms:
                exp.arms.insert(0, self.control)
        return self

    def experiment(self, name: str) -> "StudyConfig":
        """The study narrowed to one experiment's arms and families (same control, seeds,
        eval): what its own report aggregates."""
        if name not in self.experiments:
            known = ", ".join(self.experiments) or "none"
            raise ValueError(f"experiment '{name}' is not in the study (its experiments: {known})")
        exp = self.experiments[name]
        fams = exp.families or list(self.families)
        tree = self.to_dict()
        tree.update(name=f"{self.name} / {name}", description=exp.description or self.description,
                    arms={a: tree["arms"][a] for a in exp.arms},
                    families={f: tree["families"][f] for f in fams}, experiments={})
        return StudyConfig.model_validate(tree)

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())


def _absolute(tree: dict, base: Path) -> None:
    """Checkpoint paths relative to the study file's folder -> absolute."""
    for fam in (tree.get("families") or {}).values():
        if not isinstance(fam, dict):
            continue
        for key in ("tokenizer", "backbone"):
            if fam.get(key) and not hub.is_hub_ref(fam[key]) and not Path(fam[key]).is_absolute():
                fam[key] = str((base / fam[key]).resolve())
        for key in ("data", "val_data"):  # a relative folder next to the file, not a dataset name
            if isinstance(fam.get(key), str) and (base / fam[key]).exists() and not Path(fam[key]).is_absolute():
                fam[key] = str((base / fam[key]).resolve())


def merge(base: dict, over: dict) -> dict:
    """Deep merge of nested dicts (``over`` wins)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_study(path: str | Path, overrides: Optional[dict[str, Any]] = None,
               families: Optional[dict] = None) -> StudyConfig:
    """A study file + dotted overrides (``train.steps`` style keys into the study) ->
    validated StudyConfig. ``families`` (a mapping of family specs) replaces the file's."""
    p = Path(path)
    tree = read_config_file(p)
    if families is not None:
        tree["families"] = families
    _absolute(tree, p.parent)
    for key, value in (overrides or {}).items():
        set_path(tree, key, value)
    return validate_study(tree)


def validate_study(tree: dict) -> StudyConfig:
    """A validated StudyConfig whose ``hf://`` checkpoints are pinned to the commit they
    resolve to (so every arm, seed and job of the study, and its study.yaml, use one file)."""
    try:
        study = StudyConfig.model_validate(tree)
    except ValidationError as exc:
        msg = format_validation_error(exc, StudyConfig)
        raise ConfigError(msg.replace("invalid run config", "invalid study")) from None
    for fam in study.families.values():
        fam.tokenizer, fam.backbone = hub.pin(fam.tokenizer), hub.pin(fam.backbone)
    return study


def read_families(path: str | Path) -> dict:
    """A YAML file holding a ``families`` mapping (or the mapping itself) -> mapping with
    checkpoint paths made absolute from that file's folder (``sar study --models``)."""
    p = Path(path)
    tree = read_config_file(p)
    fams = tree.get("families", tree)
    wrapped = {"families": json.loads(json.dumps(fams, default=str))}
    _absolute(wrapped, p.parent)
    return wrapped["families"]
