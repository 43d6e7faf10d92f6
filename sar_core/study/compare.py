"""``sar compare A B [C ...]``: did the post-training change the model? Paired differences
with their measurement noise, on the same samples' seeds and the same validation images.

Every model is evaluated exactly as a study evaluates a run (:mod:`sar_core.study.evaluate`):
the metrics of ``sar eval`` (FID, IS, KID, precision / recall / F-score, class accuracy)
under every sampling seed, on the same labels (or validation captions) and seeds for all
models, and the metrics of ``sar diagnose`` (per-scale teacher- vs student-forced CE and
accuracy, the exposure gap, the val TF loss) on the same validation images. The first
model is the reference; for every other model and metric the difference ``model - ref``:

* sampled metrics: paired over sampling seeds (seed s of both models drew from the same
  generator stream); the 95% t-interval of the mean per-seed difference, its noise the sd
  of the per-seed differences over the seeds (each model's own sd over seeds is kept too);
* validation metrics: paired over the validation images; the 95% interval of the mean
  per-image difference, its noise the validation-set standard error of that difference.

A verdict (better / worse) is given only where the interval excludes 0; an interval that
holds 0 is ``inconclusive``; one that cannot be formed (one seed, zero spread) ``undefined``
(:func:`sar_core.study.stats.verdict`). Nothing here is tuned on the outcome.

A model argument is a ``sar train`` run folder (``config.yaml``: family, tokenizer,
adapter overrides and data are read from it; ``backbone_ema.pth`` when present, as a
study evaluates, else ``backbone.pth``), a folder holding ``backbone.pth`` (and maybe
``tokenizer.pth``, e.g. a shipped miniature), or a backbone file. What a folder or file
does not say is taken from the flags, then from the first run folder among the models.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sar_core.study.config import EvalSpec
from sar_core.study.plan import HIGHER_IS_BETTER, PER_IMAGE, SAMPLED, Log
from sar_core.study.stats import interval, noise, paired_difference, verdict


@dataclass
class ModelSpec:
    """One model of a comparison, as far as its argument says (None: not said)."""

    name: str
    source: str
    backbone: Optional[Path] = None
    family: Optional[str] = None
    tokenizer: Optional[Path] = None
    overrides: dict = field(default_factory=dict)
    data: Optional[str] = None
    data_options: dict = field(default_factory=dict)
    run_folder: bool = False


def read_model(arg: str) -> ModelSpec:
    """A run folder, a folder with ``backbone.pth``, or a backbone file -> ModelSpec."""
    import yaml

    p = Path(arg)
    name = p.stem if p.is_file() else (p.resolve().name or str(p))
    if p.is_dir() and (p / "config.yaml").is_file():
        cfg = yaml.safe_load((p / "config.yaml").read_text()) or {}
        model, data = cfg.get("model") or {}, cfg.get("data") or {}
        ema = p / "backbone_ema.pth"
        backbone = ema if ema.is_file() else p / "backbone.pth"
        if not backbone.is_file():
            raise FileNotFoundError(f"{p} is a run folder without backbone.pth: the run has not finished "
                                    "(resume it with sar train --resume), or pass one of its checkpoints' backbone")
        return ModelSpec(name, str(p), backbone, model.get("family"),
                         Path(model["tokenizer"]) if model.get("tokenizer") else None,
                         dict(model.get("overrides") or {}), data.get("name"), dict(data.get("options") or {}), True)
    if p.is_dir():
        if not (p / "backbone.pth").is_file():
            raise FileNotFoundError(f"{p} holds neither config.yaml (a sar train run folder) nor backbone.pth")
        tok = p / "tokenizer.pth"
        return ModelSpec(name, str(p), p / "backbone.pth", tokenizer=tok if tok.is_file() else None)
    if p.is_file():
        return ModelSpec(name, str(p), p)
    raise FileNotFoundError(f"model '{arg}' not found (a sar train run folder, a folder with backbone.pth, "
                            "or a backbone checkpoint file)")


def resolve_models(args: list[str], family: Optional[str] = None, tokenizer: Optional[Path] = None,
                   overrides: Optional[dict] = None) -> list[ModelSpec]:
    """ModelSpecs with every gap filled: flags first, then the first run folder's values."""
    if len(args) < 2:
        raise ValueError("sar compare needs at least two models: the reference first, then the others")
    models = [read_model(a) for a in args]
    runs = [m for m in models if m.run_folder]
    donor = runs[0] if runs else None
    seen: dict[str, int] = {}
    for m in models:
        m.family = family or m.family or (donor.family if donor else None)
        m.tokenizer = tokenizer or m.tokenizer or (donor.tokenizer if donor else None)
        base = m.overrides if m.run_folder else (dict(donor.overrides) if donor else {})
        m.overrides = {**base, **(overrides or {})}
        if m.family is None:
            raise ValueError(f"the family of '{m.source}' is unknown: pass -f FAMILY (or a run folder among the models)")
        seen[m.name] = seen.get(m.name, 0) + 1
        if seen[m.name] > 1:
            m.name = f"{m.name}-{seen[m.name]}"
    return models


def _load(m: ModelSpec, device: str):
    from sar_core.evaluate.generation import load_adapter

    return load_adapter(m.family, m.tokenizer, m.backbone, device=device, overrides=m.overrides or None)


def _model_values(res: dict, per_image: dict) -> dict:
    """Each metric of one model: its value and its own noise (sd over sampling seeds, or the
    validation-set SE)."""
    out = {}
    seeds = res["per_sampling_seed"]
    for k in SAMPLED:
        if k in res["metrics"]:
            nz = noise([r[k] for r in seeds.values()])
            out[k] = {"value": res["metrics"][k], "noise": nz["sd"], "noise_kind": f"sd over {nz['n']} sampling seeds"}
    for k, values in _validation_values(per_image).items():
        iv = interval(values.tolist())
        out[k] = {"value": iv["mean"], "noise": iv["se"], "noise_kind": f"SE over {iv['n']} validation images"}
    return out


def _validation_values(per_image: dict) -> dict:
    """Per-image values of the validation metrics (N,) float64."""
    gap_acc = (per_image["sf_acc"][:, 1:] - per_image["tf_acc"][:, 1:]).mean(1)
    return {"val_loss_tf": per_image["val_loss_tf"], "gap_mean": per_image["mean_gap_ce"], "gap_acc": gap_acc}


def _with_verdict(d: Optional[dict], higher: bool, kind: str) -> Optional[dict]:
    if d is None:
        return None
    d = {k: v for k, v in d.items() if k != "seeds"}
    return {**d, "noise": d["se"], "noise_kind": kind, "verdict": verdict(d, higher)}


def differences(ref: dict, res: dict, ref_img: dict, img: dict) -> dict:
    """Every metric's paired difference ``res - ref`` with interval, noise and verdict."""
    out = {}
    a, b = ref["per_sampling_seed"], res["per_sampling_seed"]
    for k in SAMPLED:
        if k in ref["metrics"] and k in res["metrics"]:
            d = paired_difference({s: r[k] for s, r in b.items()}, {s: r[k] for s, r in a.items()})
            out[k] = _with_verdict(d, HIGHER_IS_BETTER[k], f"SE over {d['n'] if d else 0} sampling seeds")
    va, vb = _validation_values(ref_img), _validation_values(img)
    for k in PER_IMAGE:
        d = interval((vb[k] - va[k]).tolist())
        out[k] = _with_verdict(d, HIGHER_IS_BETTER[k], f"SE over {d['n']} validation images")
    return out


def per_scale(ref: dict, res: dict, ref_img: dict, img: dict) -> list[dict]:
    """Per scale k >= 1: TF CE and exposure gap (CE) of both models and the paired difference."""
    rows = []
    for k, (ra, rb) in enumerate(zip(ref["diagnose"]["scales"], res["diagnose"]["scales"])):
        if k == 0:
            continue
        gap_a = ref_img["sf_ce"][:, k] - ref_img["tf_ce"][:, k]
        gap_b = img["sf_ce"][:, k] - img["tf_ce"][:, k]
        kind = f"SE over {len(gap_a)} validation images"
        rows.append({"scale": k, "size": ra["size"], "reference": {"tf_ce": ra["tf_ce"], "gap_ce": ra["gap_ce"]},
                     "model": {"tf_ce": rb["tf_ce"], "gap_ce": rb["gap_ce"]},
                     "gap_ce": _with_verdict(interval((gap_b - gap_a).tolist()), False, kind),
                     "tf_ce": _with_verdict(interval((img["tf_ce"][:, k] - ref_img["tf_ce"][:, k]).tolist()),
                                            False, kind)})
    return rows


def settings(spec: EvalSpec, seeds: list[int], data: str, split: str, val_images: int) -> dict:
    return {"sampling_seeds": list(seeds), "data": data, "split": split, "val_images": val_images,
            **{k: v for k, v in spec.model_dump(mode="json").items() if k not in ("sampling_seeds", "noise_seeds")}}


def compare(models: list[ModelSpec], spec: EvalSpec, *, seeds: list[int], data: Optional[str] = None,
            split: str = "val", val_images: int = 500, out: Path = Path("sar-compare"), device: str = "auto",
            log: Log = print) -> dict:
    """Evaluate every model alike, compute the paired differences, write ``out/compare.json``,
    ``compare.md``, ``grids.png`` and ``maps.png``; returns what compare.json holds."""
    from sar_core.data.datasets import open_dataset
    from sar_core.study.compare_report import write_compare
    from sar_core.study.evaluate import EvalContext

    t0 = time.time()
    if len(seeds) < 2:
        raise ValueError(f"sar compare needs at least 2 sampling seeds to measure noise, got {len(seeds)}")
    data = data or next((m.data for m in models if m.data), None)
    if data is None:
        raise ValueError("no validation data: pass --data (a dataset name, NAME:FOLDER or image folder)")
    options = next((m.data_options for m in models if m.data == data and m.data_options), {})
    out = Path(out)
    first = _load(models[0], device)
    schedule = first.default_schedule
    full = open_dataset(data, split=split, image_size=tuple(first.image_size(schedule)), deterministic=True, **options)
    n_val = min(val_images, len(full)) if val_images else len(full)
    val = _Head(full, n_val)
    ctx = EvalContext(spec, first, val, schedule, out, "compare", out / "reference_features.pt")
    ctx.device = first.device
    log(f"validation data: {data} (split {split}), {n_val} images; reference of the sampled metrics: "
        f"{ctx.reference_name}; {ctx.samples} samples per sampling seed, seeds {seeds}")
    kept, results = [], []
    for i, m in enumerate(models):
        adapter = first if i == 0 else _load(m, device)
        if list(adapter.default_schedule) != list(schedule) or (adapter.num_classes is None) != ctx.text:
            raise ValueError(f"'{m.source}' has schedule {adapter.default_schedule.to_list()} "
                             f"({'no classes' if adapter.num_classes is None else f'{adapter.num_classes} classes'}),"
                             f" the reference {schedule.to_list()}: sar compare pairs models of one schedule and "
                             "condition type (pass --override to align them)")
        log(f"{m.name}: evaluating {m.backbone} ({len(seeds)} sampling seeds, {n_val} validation images)")
        res = _evaluate(adapter, ctx, seeds, out / "models" / m.name, spec.maps)
        kept.append({k: res.pop(k) for k in ("_images", "_maps", "_per_image")})
        results.append(res)
        del adapter
    ref, ref_keep = results[0], kept[0]
    result: dict[str, Any] = {
        "reference": models[0].name,
        "settings": {**settings(spec, seeds, data, split, n_val), "reference_images": ctx.reference_name,
                     "samples": ctx.samples, "conditions": results[0]["conditions"]},
        "models": [{**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(m).items()},
                    "values": _model_values(r, kp["_per_image"]), "diagnose": r["diagnose"],
                    "per_sampling_seed": r["per_sampling_seed"], "grid": r.get("grid"), "maps": r.get("maps")}
                   for m, r, kp in zip(models, results, kept)],
        "differences": {m.name: differences(ref, r, ref_keep["_per_image"], kp["_per_image"])
                        for m, r, kp in zip(models[1:], results[1:], kept[1:])},
        "per_scale": {m.name: per_scale(ref, r, ref_keep["_per_image"], kp["_per_image"])
                      for m, r, kp in zip(models[1:], results[1:], kept[1:])},
    }
    result["pictures"] = write_pictures(ctx, models, kept, out)
    result["wall_s"] = round(time.time() - t0, 1)
    write_compare(result, out)
    return result


def _evaluate(adapter, ctx, seeds, folder: Path, maps: bool) -> dict:
    from sar_core.study.evaluate import evaluate_model

    return evaluate_model(adapter, ctx, list(seeds), folder, maps, keep=True)


def write_pictures(ctx, models: list[ModelSpec], kept: list[dict], out: Path) -> dict:
    """``grids.png`` (every model's first-seed samples, same labels / captions, one block of
    rows per model) and ``maps.png`` (difference maps side by side, and model - reference)."""
    from sar_core.evaluate.pictures import save_labelled_grid, save_maps_side_by_side
    from sar_core.study.evaluate import _grid_images, grid_columns, grid_labels

    blocks = [(m.name, _grid_images(None, ctx, k["_images"]) if ctx.text else _class_grid(ctx, k["_images"]))
              for m, k in zip(models, kept)]
    n = len(blocks[0][1])
    pics = {"grids": str(save_labelled_grid(blocks, out / "grids.png", grid_columns(ctx), **grid_labels(ctx, n),
                                            title="same labels and sampling seed in every block").relative_to(out))}
    if all(k["_maps"] for k in kept):
        pics["maps"] = str(save_maps_side_by_side([(m.name, k["_maps"]["maps"]) for m, k in zip(models, kept)],
                                                  out / "maps.png").relative_to(out))
    return pics


def _class_grid(ctx, images: torch.Tensor) -> torch.Tensor:
    """grid_per_class samples of every class from the first seed's class-major images."""
    from einops import rearrange

    per = min(ctx.eval.grid_per_class, ctx.eval.samples_per_class)
    x = rearrange(images, "(c n) ch h w -> n c ch h w", c=ctx.num_classes)[:per]
    return rearrange(x, "n c ch h w -> (n c) ch h w")


class _Head(torch.utils.data.Dataset):
    """The first ``n`` items of a dataset, keeping its ``classes`` / ``caption`` members."""

    def __init__(self, data, n: int):
        self.data, self.n = data, n
        for attr in ("classes", "caption", "num_classes"):
            if hasattr(data, attr):
                setattr(self, attr, getattr(data, attr))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.data[i]


def parse_seeds(text: str) -> list[int]:
    """'1000,1001' or '1000-1004' -> list of ints."""
    text = str(text).strip()
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            return list(range(lo, hi + 1))
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--seeds takes integers ('1000,1001,1002' or '1000-1004'), got {text!r}") from None

