"""How a study evaluates a model: the same sampling seeds, validation images and feature
extractor for every run of a family (:class:`FamilyContext`), sampled metrics per seed,
the deterministic metrics (exposure gap, val TF loss) once, pictures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange

from sar_core.checkpoint_io import atomic_write_text
from sar_core.study.config import START, StudyConfig
from sar_core.study.plan import SAMPLED, Log, training_data


class FamilyContext:
    """What every evaluation of one family shares: start model files, val data, metrics."""

    def __init__(self, study: StudyConfig, out: Path, family: str, device: str, log: Log):
        from sar_core.evaluate.metrics import get_feature_extractor
        from sar_core.evaluate.inputs import reference_set
        from sar_core.data.datasets import open_dataset
        from sar_core.evaluate.generation import load_adapter

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
        from sar_core.evaluate.metrics import reference_features_for

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


def _sampled_metrics(adapter, ctx: FamilyContext, seed: int) -> tuple[dict, torch.Tensor]:
    """Metrics of one sampling seed, and its images (class-major: samples_per_class of class 0 first)."""
    from sar_core.evaluate.metrics import class_accuracy, compute_metrics
    from sar_core.evaluate.generation import generate_images

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
    from sar_core.evaluate.generation import balanced_labels, generate_images

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
    from sar_core.evaluate.diagnostics import exposure_gap

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
    from sar_core.evaluate.difference_maps import save_difference_maps
    from sar_core.evaluate.generation import save_grid

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
