"""How a study (and ``sar compare``) evaluates a model: the same sampling seeds, validation
images and feature extractor for every model evaluated alike (:class:`EvalContext`; a
study's family: :class:`FamilyContext`), sampled metrics per seed, the deterministic
metrics (exposure gap, val TF loss) once, pictures.

Class-conditional models are sampled class-major (``samples_per_class`` of class 0 first)
and compared with ``eval.reference`` (default: the validation images). Models without
classes (text-conditioned) are sampled on the conditions of the validation images
themselves, one sample per image in order (``eval.text_samples``, cycled), and compared
with those same images: FID against the validation images with their own captions'
features. The exposure gap and the val TF loss need no classes; class accuracy is
measured whenever the extractor classifies and the conditions carry labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from einops import rearrange

from sar_core.checkpoint_io import atomic_write_text
from sar_core.study.config import START, EvalSpec, StudyConfig
from sar_core.study.plan import SAMPLED, Log, training_data


class EvalContext:
    """What every evaluation of one group of comparable models shares: the eval settings,
    schedule, validation data, feature extractor, reference images and their features."""

    def __init__(self, spec: EvalSpec, model, val, schedule, out: Path, label: str, features_path: Optional[Path]):
        from sar_core.evaluate.images import DatasetImages
        from sar_core.evaluate.inputs import reference_set
        from sar_core.evaluate.metrics import get_feature_extractor

        self.eval, self.val, self.schedule, self.out, self.label = spec, val, schedule, Path(out), label
        self.num_classes = model.num_classes
        self.text = self.num_classes is None
        self.features_path = features_path
        self.extractor = get_feature_extractor(spec.feature_extractor, spec.extractor_weights)
        size = tuple(model.image_size(schedule))
        if self.text:
            n = min(self.samples, len(val))
            self.reference = DatasetImages(torch.utils.data.Subset(val, range(n)))
            self.reference_name = f"the first {n} validation images (their captions condition the samples)"
        elif spec.reference is None:
            self.reference, self.reference_name = DatasetImages(val), f"the {len(val)} validation images"
        else:
            self.reference = reference_set(spec.reference, spec.reference_split, size)
            self.reference_name = f"{spec.reference} (split {spec.reference_split}, {len(self.reference)} images)"
        self._ref_features: Optional[dict] = None
        self._conditions = None

    @property
    def samples(self) -> int:
        """Samples of one evaluation (one sampling seed)."""
        if not self.text:
            return self.eval.samples_per_class * self.num_classes
        return self.eval.text_samples or len(self.val)

    def conditions(self):
        """(labels or None, Batch of condition payloads or None): what every model is sampled
        on. Class models: labels class-major; others: the validation items' payloads."""
        if not self.text:
            return torch.arange(self.num_classes).repeat_interleave(self.eval.samples_per_class), None
        if self._conditions is None:
            from sar_core.batch import Batch, Padded, split_target

            targets = [split_target(self.val[i % len(self.val)][1]) for i in range(self.samples)]
            if not targets[0][1]:
                raise ValueError(f"{self.label}: the model has no classes and its validation data carries no "
                                 "condition payloads (e.g. text features) to sample it on")
            labels = (torch.tensor([t[0] for t in targets]) if all(t[0] is not None for t in targets) else None)
            payloads = {k: Padded.pad([t[1][k] for t in targets]) for k in targets[0][1]}
            self._conditions = Batch(labels, conditions=payloads)
        return self._conditions.labels, self._conditions

    def titles(self, n: int) -> list[str]:
        """Labels of the first ``n`` conditions: class names, or the validation captions."""
        if not self.text:
            names = getattr(self.val, "classes", None)
            return [str(names[c]) if names is not None and c < len(names) else f"class {c}"
                    for c in range(min(n, self.num_classes))]
        caption = getattr(self.val, "caption", None)
        return [caption(i % len(self.val)) if callable(caption) else f"val image {i % len(self.val)}"
                for i in range(n)]

    def reference_features(self) -> dict:
        """Features of the reference, extracted once (``features_path``, keyed by reference,
        split, extractor, size and metrics) and shared by every evaluation and job process."""
        from sar_core.checkpoint_io import atomic_save
        from sar_core.evaluate.metrics import reference_features_for

        if self._ref_features is not None:
            return self._ref_features
        e = self.eval
        key = {"reference": self.reference_name, "split": e.reference_split, "extractor": e.feature_extractor,
               "weights": str(e.extractor_weights), "size": list(self.reference[0].shape[-2:]),
               "metrics": sorted(e.metrics), "count": len(self.reference)}
        path = self.features_path
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("key") == key:
                self._ref_features = saved["features"]
                return self._ref_features
        self._ref_features = reference_features_for(self.reference, self.extractor, e.metrics, self.device)
        if path is not None:
            atomic_save({"key": key, "features": {k: v.cpu() for k, v in self._ref_features.items()}}, path)
        return self._ref_features

    device = "cpu"  # where reference features are extracted (FamilyContext: the study's device)


class FamilyContext(EvalContext):
    """A study's family: start model files, val data, metrics (``<family>/reference_features.pt``)."""

    def __init__(self, study: StudyConfig, out: Path, family: str, device: str, log: Log):
        from sar_core.data.datasets import open_dataset
        from sar_core.evaluate.generation import load_adapter

        self.study, self.log = study, log
        self.spec = fam = study.families[family]
        self.start = load_adapter(fam.family, fam.tokenizer, fam.backbone, device=device,
                                  overrides=fam.overrides or None)
        self.device = self.start.device
        schedule = self.start.default_schedule
        size = tuple(self.start.image_size(schedule))
        val = open_dataset(fam.val_data or fam.data, split=fam.val_split, image_size=size,
                           deterministic=True, **fam.data_options)
        super().__init__(study.eval, self.start, val, schedule, out, family,
                         Path(out) / family / "reference_features.pt")

    def ensure_cache(self) -> None:
        from sar_core.data.code_cache import build_code_cache
        from sar_core.data.datasets import is_code_cache
        from sar_core.data.datasets import open_dataset

        cache = Path(training_data(self.study, self.out, self.label))
        if not self.spec.cache_codes or is_code_cache(cache):
            return
        size = tuple(self.start.image_size(self.schedule))
        train = open_dataset(self.spec.data, "train", size, deterministic=True, **self.spec.data_options)
        self.log(f"{self.label}: tokenising {self.spec.data} once into {cache}")
        build_code_cache(self.start, train, self.schedule, cache)

    def load(self, backbone: Path, overrides: dict):
        from sar_core.evaluate.generation import load_adapter

        return load_adapter(self.spec.family, self.spec.tokenizer, backbone, device=self.device,
                            overrides=overrides or None)


def _sampled_metrics(adapter, ctx: EvalContext, seed: int) -> tuple[dict, torch.Tensor]:
    """Metrics of one sampling seed, and its images (in the order of ``ctx.conditions()``)."""
    from sar_core.evaluate.generation import generate_images
    from sar_core.evaluate.metrics import class_accuracy, compute_metrics

    e = ctx.eval
    labels, batch = ctx.conditions()
    source: dict[str, Any] = {"labels": labels} if batch is None else {"conditions": batch}
    images = generate_images(adapter, **source, cfg=e.cfg, top_k=e.top_k, top_p=e.top_p, seed=seed,
                             batch_size=e.batch_size)
    m = compute_metrics(images, ctx.reference, extractor=ctx.extractor, metrics=e.metrics,
                        device=adapter.device, seed=seed, reference_features=ctx.reference_features())
    row = {k: float(m[k]) for k in SAMPLED if k in m}
    if ctx.extractor.classifier is not None and labels is not None:
        row["class_acc"] = class_accuracy(images, labels, ctx.extractor, adapter.device)
    return row, images


def grid_columns(ctx: EvalContext) -> int:
    return ctx.num_classes if not ctx.text else min(10, ctx.samples)


def _grid_images(adapter, ctx: EvalContext, sampled: torch.Tensor) -> torch.Tensor:
    """grid_per_class rows of the grid, row-major: column c = class c (class models; from the
    first sampling seed's images when ``grid_seed`` is None, else sampled with it), or the
    first samples in condition order (models without classes)."""
    from sar_core.evaluate.generation import balanced_labels, generate_images

    e = ctx.eval
    if ctx.text:
        return sampled[: e.grid_per_class * grid_columns(ctx)]
    n_cls = adapter.num_classes
    if e.grid_seed is not None or e.grid_per_class > e.samples_per_class:
        return generate_images(adapter, balanced_labels(e.grid_per_class * n_cls, n_cls), cfg=e.cfg,
                               top_k=e.top_k, top_p=e.top_p, seed=7 if e.grid_seed is None else e.grid_seed,
                               batch_size=e.batch_size)
    per_class = rearrange(sampled, "(c n) ch h w -> n c ch h w", c=n_cls)[:e.grid_per_class]
    return rearrange(per_class, "n c ch h w -> (n c) ch h w")


def grid_labels(ctx: EvalContext, n: int) -> dict:
    """Keyword arguments of :func:`~sar_core.evaluate.pictures.save_labelled_grid` for ``n`` images."""
    if ctx.text:
        return {"cell_titles": ctx.titles(n)}
    return {"column_titles": ctx.titles(ctx.num_classes)}


def _fixed_metrics(adapter, ctx: EvalContext, maps: bool = False, per_image: bool = False) -> dict:
    """Exposure gap per scale and the validation TF loss (token-weighted TF CE); with
    ``maps`` also the difference maps, from the same passes (under ``"_maps"``); with
    ``per_image`` the per-image values (tensors, under ``"_per_image"``)."""
    from sar_core.evaluate.diagnostics import exposure_gap

    e = ctx.eval
    with adapter.inference():
        gap = exposure_gap(adapter, ctx.val, ctx.schedule, e.gap_batches or None, batch_size=e.batch_size,
                           maps=maps, per_image=per_image)
    counts = ctx.schedule.token_counts
    val = sum(r["tf_ce"] * n for r, n in zip(gap["scales"], counts)) / sum(counts)
    se = gap["standard_error"]
    return {"gap_mean": gap["mean_gap_ce"], "val_loss_tf": val,
            "standard_error": {"gap_mean": se["mean_gap_ce"], "val_loss_tf": se["val_loss_tf"],
                               "num_images": gap["num_samples"]},
            "gap": [r["gap_ce"] for r in gap["scales"][1:]], "gap_acc": [r["gap_acc"] for r in gap["scales"][1:]],
            "diagnose": {k: gap[k] for k in ("schedule", "mode", "num_samples", "scales", "mean_gap_ce",
                                             "mean_gap_acc")},
            **({"_maps": {"schedule": gap["schedule"], "num_samples": gap["num_samples"], "maps": gap["maps"]}}
               if maps else {}),
            **({"_per_image": gap["per_image"]} if per_image else {})}


def _pictures(adapter, ctx: EvalContext, folder: Path, maps: Optional[dict], sampled: torch.Tensor) -> dict:
    """The labelled sample grid and, given the difference-map report of :func:`_fixed_metrics`, its PNGs."""
    from sar_core.evaluate.difference_maps import save_difference_maps
    from sar_core.evaluate.pictures import save_labelled_grid

    images = _grid_images(adapter, ctx, sampled)
    path = save_labelled_grid([(None, images)], folder / "grid.png", grid_columns(ctx), **grid_labels(ctx, len(images)))
    out = {"grid": str(path.relative_to(ctx.out))}
    if maps:
        save_difference_maps(maps, folder / "maps", name=f"{ctx.label} / {folder.name}")
        out["maps"] = str((folder / "maps" / "all_scales.png").relative_to(ctx.out))
        out["map_means"] = [None] + [float(m.mean()) for m in maps["maps"][1:]]
    return out


def evaluate_model(adapter, ctx: EvalContext, seeds: list[int], folder: Path, maps: bool,
                   keep: bool = False) -> dict:
    """Metrics under every sampling seed (+ their mean), gap, val loss, grid, maps. ``keep``
    also returns (not JSON) the first seed's images (``_images``), the difference maps
    (``_maps``) and the per-image validation values (``_per_image``)."""
    per_seed, first = {}, None
    for s in seeds:
        per_seed[str(s)], images = _sampled_metrics(adapter, ctx, s)
        first = images if first is None else first
        del images
    means = {k: sum(r[k] for r in per_seed.values()) / len(per_seed) for k in next(iter(per_seed.values()))}
    fixed = _fixed_metrics(adapter, ctx, maps, per_image=keep)
    diff_maps = fixed.pop("_maps", None)
    per_image = fixed.pop("_per_image", None)
    pictures = _pictures(adapter, ctx, folder, diff_maps, first)
    res = {"per_sampling_seed": per_seed, "metrics": {**means}, **fixed, **pictures,
           "conditions": "validation captions" if ctx.text else "class labels", "samples": ctx.samples}
    if keep:
        res.update(_images=first, _maps=diff_maps, _per_image=per_image)
    return res


def evaluate_start(ctx: FamilyContext, log: Log) -> dict:
    path = ctx.out / ctx.label / START / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    e = ctx.eval
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
