"""The run config of ``sar train``: one pydantic model, sections per concern.

A config is written as YAML or TOML (nested sections) and every field can be overridden
from the command line (flat flags such as ``--lr`` or ``--set optim.lr=3e-4``). The
resolved config is saved as ``<out>/config.yaml`` so that a run can be resumed or
reproduced from its folder alone.

    model:   family, checkpoint files, adapter overrides, training schedule
    data:    dataset name / image folder / code cache, image size, workers
    rollout: registry name (none | ssr | official) and its options
    loss:    registry name (hard | soft | naive), options, gamma, label smoothing
    optim:   AdamW and the learning-rate schedule
    train:   steps, batch, AMP, EMA, seeds, checkpoints, guards, loggers
    eval:    validation during training (``--eval-every``, ``--eval-at-end``)
    dist:    DDP (default) or FSDP2 under torchrun, collective timeout

``None`` in the rollout / loss options means "the registered class's own default" (the
``official`` rollout defaults to the official trainer's sampled, guided rollout).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from sar_core.checkpoint_io import hub
from sar_core.checkpoint_io.hub import CheckpointRef

#: the paper's recipe, peak lr 1e-4 at global batch 768, scaled to a run's global batch B by
#: the square-root rule (Adam's update noise grows as lr / sqrt(B)); README "Defaults of sar train"
PAPER_LR, PAPER_BATCH = 1e-4, 768
LR_RULE = "1e-4 * sqrt(B / 768)"


def default_lr(batch_size: int) -> float:
    """The default peak lr at global batch ``batch_size`` (train.batch_size: all ranks, all
    accumulation micro-steps): 1e-4 * sqrt(B / 768), e.g. 2.04e-5 at 32, 5.77e-5 at 256."""
    return PAPER_LR * math.sqrt(batch_size / PAPER_BATCH)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    family: str = Field(description="adapter name, e.g. var, flexvar (see `sar plugins`)")
    tokenizer: Optional[CheckpointRef] = Field(None, description="tokenizer checkpoint (upstream layout, "
                                               ".pth / .pt / .safetensors, or hf://OWNER/REPO/FILE[@REVISION]); "
                                               "without tokenizer and backbone the model is built from `overrides`")
    backbone: Optional[CheckpointRef] = Field(None, description="backbone checkpoint to post-train (as tokenizer)")
    random_tokenizer: bool = Field(False, description="train with a freshly initialised tokenizer on purpose "
                                   "(smoke tests; without it `sar train` requires a tokenizer file)")
    sources: dict[str, dict[str, str]] = Field(default_factory=dict, description="written by sar train: for "
                                               "each hf:// checkpoint, the commit and cached file it resolved to "
                                               "(tokenizer / backbone then hold the reference pinned to that commit)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="adapter config fields that win "
                                      "over what the checkpoints imply")
    schedule: Optional[str] = Field(None, description="training schedule: sides like 1_2_3_4, or a "
                                    "registered schedule sampler (e.g. flexvar-random); default: the adapter's")
    cond_drop: Optional[float] = Field(None, ge=0, le=1, description="class-dropout probability "
                                       "(default: the backbone's own)")
    resize_classes: bool = Field(False, description="resize the class embedding to the data's class count "
                                 "(new rows freshly initialised, null class kept last)")
    null_payloads: dict[str, Path] = Field(
        default_factory=dict, description="encoder-derived null payloads (features of the empty prompt) of "
        "families that need them: payload name -> file (an (n, D) tensor or a dict holding the name); "
        "default: the data's own (textimages: null_payloads.pt)")


class DataConfig(Section):
    name: str = Field(description="registered dataset, image folder (class sub-folders) or code cache folder")
    split: str = "train"
    image_size: Optional[Union[PositiveInt, tuple[PositiveInt, PositiveInt]]] = Field(
        None, description="training image size: pixels a side, or [H, W] (default: the model's)")
    options: dict[str, Any] = Field(default_factory=dict, description="extra dataset factory options")
    workers: int = Field(2, ge=0, description="DataLoader worker processes per rank")


class RolloutConfig(Section):
    name: str = Field("ssr", description="registered rollout: none, ssr, official, ...")
    scales: Optional[Literal["all", "last", "random"]] = None
    sampling: Optional[Literal["argmax", "sample"]] = None
    top_k: Optional[int] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    cfg: Optional[float] = Field(None, ge=0)
    upstream_exact: Optional[bool] = Field(None, description="guided rollouts: the official trainer's 2B-row "
                                           "teacher pass and its sampling draws (slower; default: false)")
    reuse_prefix: Optional[bool] = Field(None, description="ssr scales=last: run pass 2 on the last scale with "
                                         "pass 1's prefix keys / values (default: true; false = less memory)")
    depth: Optional[int] = Field(None, ge=1, description="ssr: stagger steps the deepest student pass feeds "
                                 "on top of ground truth (default 1, the paper's; > 1 needs scales=all and "
                                 "fewer than the schedule's scales; one pass with gradients per step)")

    def options(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude={"name"}).items() if v is not None}


class LossConfig(Section):
    name: str = Field("hard", description="registered CSF loss: hard, soft, naive, ...")
    temperature: Optional[float] = Field(None, gt=0, description="soft CSFL temperature")
    gamma: float = Field(0.5, ge=0, description="weight of the CSF loss (default: the 0.5 the embedded "
                         "studies ran; the paper's is 0.01)")
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    def options(self) -> dict:
        return {"temperature": self.temperature} if self.temperature is not None else {}


class OptimConfig(Section):
    lr: Optional[float] = Field(None, gt=0, description=f"peak learning rate; default {LR_RULE} with B the "
                                "global batch (train.batch_size), resolved and stored in config.yaml")
    lr_end: Optional[float] = Field(None, ge=0, description="final lr of a linear / cosine decay")
    lr_schedule: Optional[Literal["constant", "linear", "cosine"]] = Field(
        None, description="after warm-up; default: linear when lr_end is set, else constant")
    warmup_steps: int = Field(0, ge=0)
    warmup_start: float = Field(0.005, ge=0, le=1, description="warm-up starts at this fraction of lr")
    hold_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of the post-warm-up steps "
                                 "held at the peak before decaying (upstream 'lin0': 0.05)")
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(2.0, ge=0, description="max gradient norm (0: no clipping)")

    @property
    def schedule_kind(self) -> str:
        return self.lr_schedule or ("linear" if self.lr_end is not None else "constant")

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if (self.lr_schedule == "constant" and self.lr_end is not None and self.lr is not None
                and self.lr_end != self.lr):  # lr None: checked again once RunConfig resolves it
            raise ValueError("lr_end needs lr_schedule 'linear' or 'cosine' (the schedule is 'constant')")
        return self


class TrainConfig(Section):
    steps: int = Field(1000, gt=0, description="optimizer steps in total (a resumed run stops there too)")
    batch_size: int = Field(32, gt=0, description="global batch per optimizer step (all ranks, all "
                            "accumulation micro-steps)")
    grad_accum: int = Field(1, gt=0)
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="autocast dtype: bf16 (CUDA or CPU) or "
                                                 "fp16 (CUDA only, with a loss scaler)")
    compile: bool = Field(False, description="torch.compile each transformer block with dynamic shapes "
                          "(graphs compiled so far: compiled_graphs in metrics.jsonl)")
    compile_backend: str = Field("inductor", description="torch.compile backend (aot_eager: graph capture "
                                 "and autograd without code generation, for quick checks)")
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="recompute transformer blocks in backward to save activation memory: "
        "'full' keeps only block inputs, 'selective' keeps matmul / attention outputs")
    ema: float = Field(0.0, ge=0, lt=1, description="EMA decay of the backbone weights (0: off)")
    seed: int = 0
    device: str = "auto"
    save_every: int = Field(1000, ge=0, description="checkpoint every N steps (0: only at the end)")
    save_format: Literal["pt", "safetensors"] = Field(
        "pt", description="file format of run checkpoints and the final export: pt (step_N.pt, backbone.pth "
        "in the family's upstream layout) or safetensors (step_N.safetensors, a plain backbone.safetensors)")
    keep_last: int = Field(3, ge=1)
    log_every: int = Field(10, gt=0, description="console line every N steps (metrics.jsonl: every step)")
    max_nonfinite: int = Field(5, gt=0, description="stop after this many consecutive non-finite steps")
    max_nonfinite_total: Optional[int] = Field(None, gt=0, description="... or this many in total")
    loggers: list[str] = Field(default_factory=lambda: ["console", "jsonl"],
                               description="console, jsonl, tensorboard (sar[tensorboard]), wandb (sar[wandb]), "
                               "or a plugin's")


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every N optimizer steps on rank 0 (0: never); "
                       "OUT/eval.jsonl, OUT/eval/grid-step<N>.png, OUT/curves.png")
    at_end: Optional[bool] = Field(None, description="evaluate after the last step; default: on when "
                                   "validation data exists (eval.data, or the data's eval.split)")
    data: Optional[str] = Field(None, description="validation data (dataset name, NAME:FOLDER, image folder "
                                "or code cache); default: the training data's eval.split")
    split: str = Field("val", description="split of the validation data ('.': an image folder itself)")
    images: int = Field(256, gt=0, description="the fixed validation subset: its first N images (val TF "
                        "loss and per-scale exposure gap)")
    grid: int = Field(16, ge=0, description="samples in the grid (the same labels / first validation "
                      "captions and seed at every eval; 0: no grid)")
    samples: int = Field(0, ge=0, description="samples for FID / precision / recall against the first N "
                         "validation images (0: off)")
    feature_extractor: str = Field("inception", description="registered feature extractor of FID / "
                                   "precision / recall (as sar eval --feature-extractor)")
    extractor_weights: Optional[Path] = Field(None, description="local weights of the feature extractor")
    seed: int = Field(0, description="sampling seed of the grid and the FID samples (the same at every eval)")
    cfg: float = Field(1.5, ge=0, description="guidance scale of the eval samples")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(32, gt=0, description="batch of the eval passes (rank 0 alone)")


class DistConfig(Section):
    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Optional[Literal["nccl", "gloo"]] = Field(None, description="default: nccl on CUDA, gloo on CPU")
    find_unused_parameters: Optional[bool] = Field(
        None, description="DDP option; default: on for rollouts whose second pass skips parameters")
    timeout_s: float = Field(600.0, gt=0, description="seconds a rank waits for the others in a collective "
                             "before the run stops with an error (a frozen or dead peer rank)")


class RunConfig(Section):
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()
    out: Path = Field(Path("runs/sar"), description="run folder")
    resume: bool = Field(False, description="continue from the latest checkpoint in out/checkpoints")
    accept_data_change: bool = Field(False, description="resume although the data's contents changed since "
                                     "the run started (file count / names / sizes, see OUT/data.json)")

    @model_validator(mode="after")
    def _lr_from_batch(self) -> "RunConfig":
        """optim.lr not given: default_lr(train.batch_size), stored resolved (config.yaml, and so a
        resume, keeps it); 'lr' stays out of optim's fields set, so the run prints it as a default."""
        if self.optim.lr is None:
            lr, o = default_lr(self.train.batch_size), self.optim
            if o.lr_schedule == "constant" and o.lr_end is not None and o.lr_end != lr:
                raise ValueError("optim.lr_end needs lr_schedule 'linear' or 'cosine' (the schedule is 'constant')")
            self.optim.lr = lr
            self.optim.__pydantic_fields_set__.discard("lr")
        return self

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def with_absolute_paths(self, dataset_names: tuple[str, ...] = ()) -> "RunConfig":
        """A copy whose file paths (checkpoints, data folder, run folder) are absolute, so
        ``config.yaml`` means the same from any working directory. ``data.name`` stays as
        it is when it names a registered dataset (``dataset_names``) or no existing path."""
        cfg = self.model_copy(deep=True)
        for key in ("tokenizer", "backbone"):
            ref = getattr(cfg.model, key)
            if ref is not None and not hub.is_hub_ref(ref):
                setattr(cfg.model, key, absolute(ref))
        cfg.model.null_payloads = {k: absolute(v) for k, v in cfg.model.null_payloads.items()}
        name = cfg.data.name
        if name not in dataset_names and Path(os.path.expanduser(name)).exists():
            cfg.data.name = os.path.abspath(os.path.expanduser(name))
        val = cfg.eval.data
        if val is not None and val not in dataset_names and Path(os.path.expanduser(val)).exists():
            cfg.eval.data = os.path.abspath(os.path.expanduser(val))
        if cfg.eval.extractor_weights is not None:
            cfg.eval.extractor_weights = absolute(cfg.eval.extractor_weights)
        cfg.out = absolute(cfg.out)
        return cfg


    def with_pinned_checkpoints(self) -> "RunConfig":
        """A copy whose ``hf://`` checkpoints are pinned to the commit they resolve to now
        (fetched or found in the hub cache), each recorded in ``model.sources`` with its local
        file: ``config.yaml`` then names the exact files, and a resume reuses them."""
        cfg = self.model_copy(deep=True)
        for key in ("tokenizer", "backbone"):
            rec = hub.record(getattr(cfg.model, key))
            if rec is not None:
                setattr(cfg.model, key, rec["ref"])
                cfg.model.sources = {**cfg.model.sources, key: rec}
        return cfg


def absolute(path: str | Path) -> Path:
    """``~`` expanded, made absolute and normalised (symlinks kept, unlike resolve())."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


# ----------------------------------------------------------------------------- loading
class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem."""


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml / .yml / .json) or TOML (.toml) file -> nested dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as exc:
        raise ConfigError(f"cannot parse config {p}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars / lists ('3e-4', 'true', '[1, 2]'), else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _is_float(value):  # YAML 1.1 reads '3e-4' as a string
        return float(value)
    return value


def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """``tree['a']['b'] = value`` for ``dotted = 'a.b'`` (creating sections as needed)."""
    keys = [k for k in dotted.split(".") if k]
    if not keys:
        raise ConfigError(f"empty config key in override {dotted!r}")
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: '{k}' is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_set(items: list[str]) -> dict[str, Any]:
    """``['optim.lr=3e-4', ...]`` -> {'optim.lr': 0.0003, ...}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. optim.lr=3e-4), got {item!r}")
        out[key.strip()] = parse_value(value.strip())
    return out


def format_validation_error(exc: ValidationError, root: Optional[type] = None) -> str:
    """One line per problem; an unknown field names the closest known one of ``root``'s
    (default: the run config) section at that place."""
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field" + _suggest_field(e["loc"], root or RunConfig)
        given = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(given, dict) else f" (got {given!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "invalid run config:\n" + "\n".join(lines)


def _suggest_field(loc: tuple, root: type) -> str:
    """``"; did you mean optim.lr?"`` for an unknown field at ``loc`` (e.g. ('optim', 'lrr'))."""
    import difflib

    model: Any = root
    for part in loc[:-1]:
        info = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if info is None:
            return ""
        model = info.annotation
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=2, cutoff=0.6)
    prefix = "".join(f"{p}." for p in loc[:-1])
    return ("; did you mean " + " or ".join(prefix + c for c in close) + "?") if close else ""


def build_config(base: Optional[dict] = None, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Validate ``base`` (nested) with dotted ``overrides`` applied; raise ConfigError."""
    tree = json.loads(json.dumps(base or {}, default=str))
    for key, value in (overrides or {}).items():
        set_path(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Config file (optional) + dotted overrides -> validated RunConfig."""
    return build_config(read_config_file(path) if path else {}, overrides)
