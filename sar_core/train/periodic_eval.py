"""Validation during training: ``sar train --eval-every N`` and ``--eval-at-end``, on rank 0.

Every ``eval.every`` steps (and after the last step: ``eval.at_end``, on by default when
validation data exists) rank 0 measures the live weights (not the EMA) with the code of
:mod:`sar_core.evaluate`:

* the val TF loss (token-weighted teacher-forced CE) and the per-scale exposure gap
  (:func:`~sar_core.evaluate.diagnostics.exposure_gap`) on a FIXED validation subset: the
  first ``eval.images`` items of ``eval.data`` (default: the training data's ``eval.split``,
  ``val``), read and tokenised once before step 1;
* a sample grid (:func:`~sar_core.evaluate.generation.generate_images`, seed ``eval.seed``)
  on the same conditions every time: class-balanced labels 0, 1, 2, ... for class models, the
  first validation captions (their payloads) for text-conditioned ones, each cell titled;
* with ``eval.samples`` K > 0: FID / precision / recall (and class accuracy where the
  extractor classifies) of K samples against the first K validation images, through
  :func:`~sar_core.evaluate.metrics.compute_metrics` with ``eval.feature_extractor`` (the
  reference's features extracted once).

Written: one line per eval in ``OUT/eval.jsonl`` (``step``, ``wall_s`` the eval cost and
``cost_s`` its parts: gap, grid, samples, curves; ``metrics``, ``grid``), the grid as ``OUT/eval/grid-step<N>.png`` and ``OUT/curves.png``
(:mod:`sar_core.train.curves`), redrawn at each eval and at the end; a console line with
the numbers and the cost. Files are written atomically.

Training is untouched: every eval runs under forked RNG streams (torch CPU / CUDA, numpy,
Python), in eval mode with condition dropout 0 (restored after), without gradients and, for
``--compile``, eagerly (no graph compiled for it). A run with evals has the same weights and
``metrics.jsonl`` as one without, and a resumed run drops the ``eval.jsonl`` lines after the
step it resumes from. The other ranks wait in the next step's collective meanwhile, so an
eval must take less than ``dist.timeout_s``. A stop signal skips the eval under way. FSDP2
shards the weights over ranks, so evals need DDP or one process.

Driven by the trainer's run-time hooks (:mod:`sar_core.hookspecs`): the trainer registers a
:class:`PeriodicEval` as a plugin for the run's duration.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sar_core.checkpoint_io import atomic_write_text
from sar_core.hookspecs import hookimpl

SAMPLE_METRICS = ("fid", "prc")
HISTORY_KEYS = ("step", "loss", "loss_tf", "loss_csf", "lr", "grad_norm")


class EvalAbandoned(Exception):
    """A stop signal arrived during an eval: the rest of it is skipped."""


@contextlib.contextmanager
def isolated_rng(device: torch.device):
    """Everything inside draws from copies of the global RNG streams: torch (CPU and the
    CUDA device), numpy and Python's ``random`` are as before afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def open_validation(cfg, adapter, schedule, registry, required: bool):
    """The validation dataset of a run (``eval.data``, else the training data's
    ``eval.split``), or None when there is none and ``required`` is False."""
    from sar_core.data.datasets import is_code_cache, open_dataset

    e = cfg.eval
    spec = e.data or cfg.data.name
    where = f"--val-data {spec}" if e.data else f"the '{e.split}' split of --data {spec}"
    try:
        if is_code_cache(spec):
            if e.data is None:
                raise ValueError(f"{spec} is a code cache: it has no '{e.split}' split")
            from sar_core.data.code_cache import CodeCacheDataset

            data = CodeCacheDataset(spec, adapter=adapter, schedule=schedule, flips="none")
        else:
            options = dict(cfg.data.options) if e.data is None else {
                k: v for k, v in cfg.data.options.items() if k == "class_map"}
            data = open_dataset(spec, split=e.split, image_size=tuple(adapter.image_size(schedule)),
                                deterministic=True, **options)
        if len(data) == 0:
            raise ValueError(f"{where} holds no items")
    except (ValueError, FileNotFoundError) as exc:
        if not required:
            return None
        raise ValueError(f"validation during training (--eval-every / --eval-at-end) needs validation data: "
                         f"{' '.join(str(exc).split())}; pass --val-data (or --set eval.split=...)") from None
    from sar_core.data.payloads import check_dataset_payloads

    check_dataset_payloads(adapter, data, where)
    return data


class PeriodicEval:
    """The evals of one run (rank 0): a plugin of the run-time hooks (see the module docstring)."""

    __name__ = "sar-periodic-eval"

    @classmethod
    def for_run(cls, trainer) -> Optional["PeriodicEval"]:
        """The run's evals, or None when off: ``eval.every`` 0 and no ``eval.at_end``, or at-end
        by default without validation data. Checks the validation data and the feature
        extractor before step 1 (a one-line ValueError)."""
        cfg = trainer.config
        e = cfg.eval
        asked = e.every > 0 or e.at_end is True
        if not asked and e.at_end is False:
            return None
        if cfg.dist.strategy == "fsdp" and trainer.env.enabled:
            if asked:
                raise ValueError("--eval-every / --eval-at-end need the whole model on rank 0: use --dist ddp "
                                 "(FSDP2 shards it), or evaluate the exported backbone with sar compare")
            return None
        schedule = trainer.adapter.default_schedule
        with isolated_rng(trainer.env.device):
            val = open_validation(cfg, trainer.adapter, schedule, trainer.registry, asked)
            if val is None:
                return None
            extractor = None
            if e.samples:
                from sar_core.data.datasets import is_code_cache
                from sar_core.evaluate.metrics import get_feature_extractor

                if is_code_cache(e.data or cfg.data.name):
                    raise ValueError("--eval-samples compares samples with validation images, and the validation "
                                     "data is a code cache: pass an image folder or dataset as --val-data")
                extractor = get_feature_extractor(e.feature_extractor, e.extractor_weights)
            return cls(trainer, val, schedule, extractor, at_end=e.at_end is not False)

    def __init__(self, trainer, val, schedule, extractor, at_end: bool):
        self.trainer, self.val, self.schedule, self.extractor = trainer, val, schedule, extractor
        self.e = trainer.config.eval
        self.at_end = at_end
        self.adapter = trainer.adapter
        self.out = Path(trainer.out_dir)
        self.path = self.out / "eval.jsonl"
        self.batches = self._fixed_subset() if trainer.env.is_main else []
        self.history: list[dict] = []
        self.rows: list[dict] = []
        self._ref_features: Optional[dict] = None
        self._costs: dict[str, float] = {}
        self._sources: dict[int, tuple[dict, list[str]]] = {}
        self.last_step: Optional[int] = None

    # ------------------------------------------------------------------ what is evaluated
    def _fixed_subset(self) -> list:
        """The first ``eval.images`` validation items as batches of codes (tokenised once:
        the tokenizer is not trained) with their labels / payloads, on the CPU."""
        from sar_core.batch import Batch, collate

        n, bs, out = min(self.e.images, len(self.val)), self.e.batch_size, []
        with self.adapter.inference(), torch.no_grad():
            for i in range(0, n, bs):
                batch = collate([self.val[j] for j in range(i, min(i + bs, n))])
                codes = batch.codes
                if codes is None:
                    codes = self.adapter.encode(batch.images.to(self.adapter.device), self.schedule)
                out.append(Batch(batch.labels, codes=[c.cpu() for c in codes], conditions=batch.conditions))
        self.num_images = n
        return out

    def _conditions(self, n: int) -> tuple[dict, list[str]]:
        """(sampling source, cell titles) of ``n`` samples: balanced class labels, or the payloads
        of the first validation items (cycled) with their captions."""
        if n in self._sources:  # read once: the same conditions at every eval
            return self._sources[n]
        self._sources[n] = self._read_conditions(n)
        return self._sources[n]

    def _read_conditions(self, n: int) -> tuple[dict, list[str]]:
        from sar_core.evaluate.generation import balanced_labels

        C = self.adapter.num_classes
        if C is not None:
            labels = balanced_labels(n, C)
            names = getattr(self.val, "classes", None)
            return {"labels": labels}, [str(names[c]) if names is not None and c < len(names) else f"class {c}"
                                        for c in labels.tolist()]
        from sar_core.batch import Batch, Padded, split_target

        idx = [i % len(self.val) for i in range(n)]
        targets = [split_target(self.val[i][1]) for i in idx]
        payloads = {k: Padded.pad([t[1][k] for t in targets]) for k in targets[0][1]}
        labels = torch.tensor([t[0] for t in targets]) if all(t[0] is not None for t in targets) else None
        caption = getattr(self.val, "caption", None)
        titles = [caption(i) if callable(caption) else f"val item {i}" for i in idx]
        return {"conditions": Batch(labels, conditions=payloads)}, titles

    def _reference(self):
        from sar_core.evaluate.images import DatasetImages

        return DatasetImages(torch.utils.data.Subset(self.val, range(min(self.e.samples, len(self.val)))))

    # ------------------------------------------------------------------ one eval
    def evaluate(self, step: int) -> Optional[dict]:
        """Measure the weights after ``step``; write eval.jsonl, the grid and curves.png."""
        t0 = time.perf_counter()
        try:
            with isolated_rng(self.adapter.device), self._stance(), torch.no_grad():
                metrics, grid = self._measure(step)
        except EvalAbandoned:
            self.trainer.log(f"eval at step {step} skipped: stop signal")
            return None
        row = {"step": step, "wall_s": None, "cost_s": self._costs, "num_images": self.num_images,
               "metrics": metrics, "grid": grid}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        self.last_step = step
        t1 = time.perf_counter()
        self._curves()
        self._costs["curves"] = round(time.perf_counter() - t1, 3)
        row["wall_s"] = round(time.perf_counter() - t0, 3)  # the whole eval: passes, pictures, curves
        atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.path)
        self.trainer.log(self._line(row))
        return row

    def _check_stop(self) -> None:
        if self.trainer.stop.requested:
            raise EvalAbandoned()

    def _stance(self):
        if self.trainer.config.train.compile and hasattr(torch.compiler, "set_stance"):
            return torch.compiler.set_stance("force_eager")  # no graph compiled for the evals
        return contextlib.nullcontext()

    def _autocast(self):
        dtype, dev = self.trainer.amp_dtype, self.adapter.device
        return torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def _measure(self, step: int) -> tuple[dict, Optional[str]]:
        from sar_core.evaluate.diagnostics import exposure_gap
        from sar_core.evaluate.generation import generate_images

        e, a = self.e, self.adapter
        self._costs = {}
        self._check_stop()
        t = time.perf_counter()
        with self._autocast():
            gap = exposure_gap(a, self.batches, self.schedule, batch_size=e.batch_size)
        counts = self.schedule.token_counts
        rows = gap["scales"]
        m: dict[str, Any] = {
            "val_loss_tf": sum(r["tf_ce"] * n for r, n in zip(rows, counts)) / sum(counts),
            "gap_mean": gap["mean_gap_ce"], "gap_acc_mean": gap["mean_gap_acc"],
            "gap": [r["gap_ce"] for r in rows[1:]], "gap_acc": [r["gap_acc"] for r in rows[1:]],
            "standard_error": {"val_loss_tf": gap["standard_error"]["val_loss_tf"],
                               "gap_mean": gap["standard_error"]["mean_gap_ce"]}}
        self._costs["gap"] = round(time.perf_counter() - t, 3)
        grid = None
        sampling = dict(cfg=e.cfg, top_k=e.top_k, top_p=e.top_p, seed=e.seed, batch_size=e.batch_size)
        if e.grid:
            self._check_stop()
            source, titles = self._conditions(e.grid)
            with self._autocast():
                images = generate_images(a, **source, **sampling)
            grid = self._save_grid(images, titles, step)
            self._costs["grid"] = round(time.perf_counter() - t - self._costs["gap"], 3)
        if e.samples:
            self._check_stop()
            t2 = time.perf_counter()
            m.update(self._sample_metrics(sampling))
            self._costs["samples"] = round(time.perf_counter() - t2, 3)
        return m, grid

    def _sample_metrics(self, sampling: dict) -> dict:
        from sar_core.evaluate.generation import generate_images
        from sar_core.evaluate.metrics import class_accuracy, compute_metrics, reference_features_for

        a, ref = self.adapter, self._reference()
        if self._ref_features is None:
            self._ref_features = reference_features_for(ref, self.extractor, SAMPLE_METRICS, a.device)
        source, _ = self._conditions(self.e.samples)
        with self._autocast():
            images = generate_images(a, **source, **sampling)
        self._check_stop()
        res = compute_metrics(images, ref, extractor=self.extractor, metrics=SAMPLE_METRICS, device=a.device,
                              seed=self.e.seed, reference_features=self._ref_features)
        out = {k: float(res[k]) for k in ("fid", "precision", "recall", "f_score") if k in res}
        labels = source.get("labels")
        if labels is None and source.get("conditions") is not None:
            labels = source["conditions"].labels
        if self.extractor.classifier is not None and labels is not None:
            out["class_acc"] = class_accuracy(images, labels, self.extractor, a.device)
        return out

    def _save_grid(self, images: torch.Tensor, titles: list[str], step: int) -> str:
        from sar_core.evaluate.pictures import save_labelled_grid

        path = self.out / "eval" / f"grid-step{step}.png"
        save_labelled_grid([(None, images)], path, min(8, len(images)), cell_titles=titles,
                           title=f"step {step}: seed {self.e.seed}, cfg {self.e.cfg:g}")
        return str(path.relative_to(self.out))

    def _curves(self) -> None:
        from sar_core.train.curves import plot_curves

        cfg = self.trainer.config
        plot_curves(self.history, self.rows, self.out / "curves.png",
                    title=f"{cfg.model.family}: rollout {cfg.rollout.name}, {self.trainer.total_steps} steps")

    @staticmethod
    def _line(row: dict) -> str:
        m = row["metrics"]
        parts = [f"val TF loss {m['val_loss_tf']:.4f}", f"exposure gap {m['gap_mean']:+.4f}"]
        parts += [f"{k} {m[k]:.4g}" for k in ("fid", "precision", "recall", "class_acc") if k in m]
        where = f"; {row['grid']}" if row.get("grid") else ""
        return (f"eval at step {row['step']} ({row['wall_s']:.1f} s, {row['num_images']} val images): "
                + ", ".join(parts) + where)

    # ------------------------------------------------------------------ hooks
    @hookimpl
    def on_train_start(self, run) -> None:
        """Keep the eval.jsonl lines and the metrics.jsonl history up to the step the run
        starts from (a resume redoes what came after)."""
        start = int(run.step)
        self.rows = [r for r in _read_jsonl(self.path) if int(r.get("step", 0)) <= start]
        if self.path.exists() or self.rows:
            atomic_write_text("".join(json.dumps(r) + "\n" for r in self.rows), self.path)
        self.history = [{k: r.get(k) for k in HISTORY_KEYS} for r in _read_jsonl(self.out / "metrics.jsonl")
                        if int(r.get("step", 0)) <= start]
        self.last_step = self.rows[-1]["step"] if self.rows else None

    @hookimpl
    def on_step_end(self, step: int, metrics: dict) -> None:
        self.history.append({k: metrics.get(k) for k in HISTORY_KEYS} | {"step": step})
        if self.e.every and step % self.e.every == 0:
            self.evaluate(step)

    @hookimpl
    def on_train_end(self, run) -> None:
        """The eval after the last step (unless one ran at that step), and curves.png."""
        status = getattr(run, "status", None)
        if status == "finished" and self.at_end and self.last_step != run.step:
            self.evaluate(run.step)
        elif status in ("finished", "nonfinite", "signalled"):
            self._curves()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if isinstance(rec, dict):
            rows.append(rec)
    return rows
