"""Exposure-bias diagnostics: how much worse a model does on its own inputs, per scale.

For every transition k -> k+1 of a schedule, the *one-step student-forced* pass feeds the
model, at scale k+1, the input its own sampler would build from its greedy (argmax)
teacher-forced prediction at scale k, with ground truth everywhere else
(``adapter.stagger_inputs(gt, pred, schedule, [k])``). The exposure gap of scale k+1 is

    gap_ce  = CE(student-forced logits at k+1) - CE(teacher-forced logits at k+1)
    gap_acc = acc(student-forced) - acc(teacher-forced)

averaged over tokens and samples. ``mode='joint'`` instead staggers every transition in
one pass (what the SSR rollout trains on), so scale k+1 also sees shifted inputs below.
Only the adapter contract is used, so every family works; accuracy of bitwise codes is
per bit. For a family that is :attr:`~sar_core.adapter.ScaleWiseAdapter.prefix_stable`, the
per-scale pass for transition k runs over the first k+2 scales only (what it measures); one
that also :attr:`~sar_core.adapter.ScaleWiseAdapter.reuses_prefix` runs scale k+1 alone on the
teacher pass's keys / values; a within-scale family
(:attr:`~sar_core.adapter.ScaleWiseAdapter.attention`) runs [scale 0, scale k+1] alone, reading
nothing of the teacher pass. Scale 0 (the start token) has no student-forced counterpart.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset

from sar_core.batch import Batch, collate
from sar_core.sar.prefix_cache import PrefixKV, scale_alone, scales_alone
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes, group_codes, group_logits, token_argmax, token_ce

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits at k, gt at k) -> codes


def _batches(data: Dataset | Iterable, batch_size: int) -> Iterable:
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    return data


def _token_acc(logits: torch.Tensor, target: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """(B, n): fraction of groups (1 for index codes, d bits) predicted right."""
    hit = group_logits(logits, bits).argmax(-1) == group_codes(target, bits)
    return hit.float().mean(-1)


class _Sums:
    def __init__(self, K: int):
        self.v = {key: [0.0] * K for key in ("tf_ce", "tf_acc", "sf_ce", "sf_acc")}
        self.n = [0] * K
        # per image: token-weighted TF CE and the mean over scales >= 1 of the CE gap
        self.img_tf: list[torch.Tensor] = []
        self.img_gap: list[torch.Tensor] = []
        # per image and scale (B, K) float64: tf_ce, tf_acc, sf_ce, sf_acc (sf NaN at scale 0)
        self.img_scales: dict[str, list[torch.Tensor]] = {key: [] for key in self.v}
        self.maps: Optional[list[torch.Tensor]] = None  # per-token argmax disagreement sums

    def per_image_se(self) -> dict:
        """Standard error over images of the TF loss and of the mean gap: how much either
        would move on another draw of as many images (the noise of a deterministic metric)."""
        out = {}
        for key, parts in (("val_loss_tf", self.img_tf), ("mean_gap_ce", self.img_gap)):
            x = torch.cat(parts) if parts else torch.zeros(0)
            out[key] = float(x.std() / len(x) ** 0.5) if len(x) > 1 else None
        return out

    def per_image(self) -> dict:
        """Per-image values (CPU float64), in data order: ``val_loss_tf`` and ``mean_gap_ce``
        (N,), and ``tf_ce`` / ``tf_acc`` / ``sf_ce`` / ``sf_acc`` (N, K): what paired
        comparisons of two models on the same images need."""
        out = {"val_loss_tf": torch.cat(self.img_tf).double(), "mean_gap_ce": torch.cat(self.img_gap).double()}
        return {**out, **{key: torch.cat(parts) for key, parts in self.img_scales.items()}}

    def add(self, key: str, k: int, values_Bn: torch.Tensor) -> None:
        self.v[key][k] += float(values_Bn.double().sum())

    def mean(self, key: str, k: int) -> float:
        return self.v[key][k] / max(self.n[k], 1)


@torch.no_grad()
def _one_batch(adapter, codes: list, cond: Any, schedule: Schedule, mode: str,
               predict: Optional[Predict], sums: _Sums) -> None:
    bits, K, dev = adapter.bits_per_token, len(schedule), adapter.device
    codes = [c.to(dev) for c in codes]
    target = cat_codes(codes)
    short = mode == "per_scale" and (adapter.prefix_stable or scales_alone(adapter))
    cache = (PrefixKV(schedule.offsets[K - 1]) if short and adapter.reuses_prefix and not scales_alone(adapter)
             else None)
    tf_in = adapter.teacher_inputs(codes, schedule)
    if cache is not None:
        logits_tf = adapter.backbone(cond, tf_in, schedule, prefix=cache.record()).float()
    else:
        logits_tf = adapter.forward(cond, tf_in, schedule).float()
    preds, tf_ce_k = [], []
    per = {key: torch.full((target.shape[0], K), float("nan"), dtype=torch.float64) for key in sums.v}
    for k in range(K):
        sl = schedule.slice(k)
        lg = logits_tf[:, sl]
        tf_ce_k.append(token_ce(lg, target[:, sl], bits).double())
        acc = _token_acc(lg, target[:, sl], bits)
        sums.add("tf_ce", k, tf_ce_k[-1])
        sums.add("tf_acc", k, acc)
        per["tf_ce"][:, k], per["tf_acc"][:, k] = tf_ce_k[-1].mean(1).cpu(), acc.double().mean(1).cpu()
        sums.n[k] += target[:, sl].shape[0] * target[:, sl].shape[1]
        preds.append(token_argmax(lg, bits) if predict is None else predict(lg, codes[k]))
    sums.img_tf.append(torch.cat(tf_ce_k, 1).mean(1).cpu())
    gap_B = torch.zeros(target.shape[0], dtype=torch.float64, device=target.device)
    groups = [list(range(K - 1))] if mode == "joint" else [[k] for k in range(K - 1)]
    for ks in groups:
        inputs = adapter.stagger_inputs(codes, preds, schedule, ks)
        for k, lg in _student_logits(adapter, cond, inputs, schedule, ks, short, cache):
            sl = schedule.slice(k + 1)
            sf = token_ce(lg, target[:, sl], bits)
            sf_acc = _token_acc(lg, target[:, sl], bits)
            sums.add("sf_ce", k + 1, sf)
            sums.add("sf_acc", k + 1, sf_acc)
            per["sf_ce"][:, k + 1], per["sf_acc"][:, k + 1] = sf.double().mean(1).cpu(), sf_acc.double().mean(1).cpu()
            if sums.maps is not None:
                sums.maps[k + 1] += _disagree_Bn(lg, logits_tf[:, sl], bits).double().sum(0).cpu()
            gap_B += (sf.double() - tf_ce_k[k + 1]).mean(1) / (K - 1)
    sums.img_gap.append(gap_B.cpu())
    for key, values in per.items():
        sums.img_scales[key].append(values)


def _student_logits(adapter, cond: Any, inputs: torch.Tensor, schedule: Schedule, ks: list, short: bool,
                    cache: Optional[PrefixKV]):
    """(k, logits of scale k+1) of the student-forced pass over ``inputs`` for each k in ``ks``.
    One transition of a prefix-stable family runs over the first k+2 scales only; one that
    also reuses prefixes runs scale k+1 alone on the teacher pass's keys / values; one of a
    within-scale family runs [scale 0, scale k+1] only."""
    first = schedule.first_len
    if short and len(ks) == 1:
        k = ks[0]
        if scales_alone(adapter):
            sub, logits = scale_alone(adapter.forward, cond, inputs, schedule, k + 1)
            return [(k, logits[:, sub.first_len:].float())]
        head = schedule.first(k + 2)
        if cache is not None:
            n0 = schedule.offsets[k + 1]
            tail = inputs[:, n0 - first:head.total_tokens - first]
            return [(k, adapter.backbone(cond, tail, head, prefix=cache.head(n0).replay()).float())]
        logits = adapter.forward(cond, inputs[:, :head.total_tokens - first], head).float()
    else:
        logits = adapter.forward(cond, inputs, schedule).float()
    return [(k, logits[:, schedule.slice(k + 1)]) for k in ks]


def _split_batch(adapter, batch: Any, schedule: Schedule) -> tuple[list, Any, int]:
    """A :class:`~sar_core.data.datasets.Batch` (or an (images | codes, labels) pair) -> (codes,
    condition on the model's device, batch size)."""
    dev = adapter.device
    if not isinstance(batch, Batch):
        x, labels = batch[0], batch[1]
        batch = Batch(labels, codes=list(x)) if isinstance(x, (list, tuple)) else Batch(labels, images=x)
    batch = batch.to(dev)
    if batch.codes is not None:
        if len(batch.codes) != len(schedule):
            raise ValueError(f"batch has codes for {len(batch.codes)} scales, schedule {schedule} "
                             f"has {len(schedule)}")
        codes = list(batch.codes)
    else:
        codes = adapter.encode(batch.images, schedule)
    return codes, adapter.condition_to(adapter.condition(batch), dev), len(batch)


def exposure_gap(adapter, data: Dataset | Iterable, schedule: Schedule | str | None = None,
                 batches: Optional[int] = None, *, batch_size: int = 32, mode: str = "per_scale",
                 predict: Optional[Predict] = None, maps: bool = False, per_image: bool = False) -> dict:
    """Per-scale teacher-forced vs one-step student-forced CE / accuracy and their gap.

    ``data`` is a dataset of ``(images | codes, target)`` items (see :mod:`sar_core.data.datasets`;
    e.g. a :class:`~sar_core.data.code_cache.CodeCacheDataset`) or an iterable of
    :class:`~sar_core.data.datasets.Batch` / ``(images | codes, labels)`` batches; the condition
    comes from ``adapter.condition(batch)``, so class labels and payloads both work;
    ``batches`` caps how many batches are
    used. ``predict`` replaces the argmax prediction (tests use an oracle). ``maps=True``
    (per-scale mode) also returns the difference maps of :mod:`sar_core.evaluate.difference_maps`
    from the same passes, under ``"maps"``. ``per_image=True`` adds the per-image values of
    :meth:`_Sums.per_image` (tensors, not JSON) under ``"per_image"``.
    """
    if mode not in ("per_scale", "joint"):
        raise ValueError(f"mode must be 'per_scale' or 'joint', got {mode!r}")
    schedule = Schedule.parse(schedule) if schedule is not None else adapter.default_schedule
    if len(schedule) < 2:
        raise ValueError("the exposure gap needs a schedule of at least two scales")
    sums, n_samples = _Sums(len(schedule)), 0
    if maps:
        if mode != "per_scale":
            raise ValueError("difference maps need mode='per_scale'")
        sums.maps = [torch.zeros(h * w, dtype=torch.float64) for h, w in schedule]
    with adapter.inference():
        for i, batch in enumerate(_batches(data, batch_size)):
            if batches is not None and i >= batches:
                break
            codes, cond, n = _split_batch(adapter, batch, schedule)
            _one_batch(adapter, codes, cond, schedule, mode, predict, sums)
            n_samples += n
    if n_samples == 0:
        raise ValueError("no batches to evaluate")
    report = _report(adapter, schedule, mode, n_samples, sums)
    if per_image:
        report["per_image"] = sums.per_image()
    if maps:
        report["maps"] = [None] + [rearrange(sums.maps[k] / n_samples, "(h w) -> h w", h=h, w=w).float()
                                   for k, (h, w) in enumerate(schedule) if k > 0]
    return report


def _disagree_Bn(logits_a: torch.Tensor, logits_b: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """(B, n): fraction of a token's groups (1, or d bits) whose argmax differs."""
    a = group_logits(logits_a, bits).argmax(-1)
    b = group_logits(logits_b, bits).argmax(-1)
    return (a != b).float().mean(-1)


def _report(adapter, schedule: Schedule, mode: str, n_samples: int, sums: _Sums) -> dict:
    rows = []
    for k, (h, w) in enumerate(schedule):
        row = {"scale": k, "size": [h, w], "tf_ce": sums.mean("tf_ce", k), "tf_acc": sums.mean("tf_acc", k)}
        if k == 0:
            row.update(sf_ce=None, sf_acc=None, gap_ce=None, gap_acc=None, input_error=None)
        else:
            row.update(sf_ce=sums.mean("sf_ce", k), sf_acc=sums.mean("sf_acc", k),
                       input_error=1.0 - sums.mean("tf_acc", k - 1))
            row.update(gap_ce=row["sf_ce"] - row["tf_ce"], gap_acc=row["sf_acc"] - row["tf_acc"])
        rows.append(row)
    gaps = rows[1:]
    return {"family": adapter.name, "schedule": schedule.to_list(), "mode": mode, "num_samples": n_samples,
            "scales": rows,
            "mean_gap_ce": sum(r["gap_ce"] for r in gaps) / len(gaps),
            "mean_gap_acc": sum(r["gap_acc"] for r in gaps) / len(gaps),
            "standard_error": sums.per_image_se()}


def plot_exposure_gap(report: dict, path) -> None:
    """PNG: teacher- vs student-forced CE per scale (left), the CE gap (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["scales"]
    ks = [r["scale"] for r in rows]
    labels = ["x".join(map(str, r["size"])) for r in rows]
    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)  # Agg canvas: no display needed, pyplot's global state untouched
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ks, [r["tf_ce"] for r in rows], "o-", label="teacher-forced")
    ax1.plot(ks[1:], [r["sf_ce"] for r in rows[1:]], "s-", label="student-forced (one step)")
    ax1.set(xlabel="scale", ylabel="cross-entropy", title="per-scale loss")
    ax1.legend()
    ax2.bar(ks[1:], [r["gap_ce"] for r in rows[1:]], color="tab:red")
    ax2.axhline(0, color="black", linewidth=0.8)
    ax2.set(xlabel="scale", ylabel="CE gap (student - teacher)", title="exposure gap")
    for ax in (ax1, ax2):
        ax.set_xticks(ks)
        ax.set_xticklabels(labels, rotation=45, fontsize=8)
    fig.suptitle(f"{report['family']}  schedule {report['schedule']}  ({report['num_samples']} samples)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
