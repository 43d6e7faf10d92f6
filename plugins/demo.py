"""``sar demo``: SAR vs plain teacher-forcing continuation on the embedded default.

The embedded default is a tiny FlexVAR for 16x16 digits (scikit-learn's bundled
``load_digits``), pretrained to a flat validation loss by ``sar pretrain`` (the exact
command is in ``assets/demo/pretrain.json``). From that same start and with the same seeds
the demo post-trains two arms for the same number of steps:

* ``tf``: rollout ``none`` (plain teacher-forcing continuation, the control arm);
* ``sar``: rollout ``ssr`` over all scales with the ``hard`` CSF loss.

It then evaluates both (FID / precision / recall with the project's digit-classifier
features via torch-fidelity, class accuracy of samples, per-scale exposure gap, validation
TF loss) over every training seed and writes a report folder (report.md / report.html,
results.json, sample grids, loss and gap plot). Everything runs offline on the CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, pstdev
from typing import Callable, Optional

import torch

from sar_core.hookspecs import hookimpl

ASSETS = Path(__file__).parent / "assets" / "demo"
FAMILY = "flexvar"
DATA = "digits"


@dataclass
class DemoSettings:
    out: Path = Path("sar-demo-report")
    steps: int = 150
    seeds: tuple[int, ...] = (0, 1)
    batch_size: int = 32
    lr: float = 1e-4
    gamma: float = 0.5
    samples_per_class: int = 50
    cfg: float = 1.0
    device: str = "cpu"
    assets: Path = ASSETS
    arms: dict = field(default_factory=lambda: {
        "tf": {"rollout": {"name": "none"}},
        "sar": {"rollout": {"name": "ssr", "scales": "all"}, "loss": {"name": "hard"}},
    })


class _StepProgress:
    """Run-time plugin advancing a rich progress task and keeping the loss history."""

    def __init__(self, advance: Callable[[], None]):
        self.advance, self.history = advance, []

    @hookimpl
    def on_step_end(self, step: int, metrics: dict) -> None:
        self.history.append({k: metrics[k] for k in ("step", "loss_tf", "loss_csf", "grad_norm")})
        self.advance()


def _start_files(assets: Path) -> tuple[Path, Path, dict]:
    """The shipped checkpoints and the model fields checkpoints do not record (schedule,
    image size), read from the pretraining summary."""
    tok, bb, summary = assets / "tokenizer.pth", assets / "backbone.pth", assets / "pretrain.json"
    for p in (tok, bb, summary):
        if not p.is_file():
            raise FileNotFoundError(f"demo model file missing: {p} (re-create the model with the command "
                                    f"in {assets / 'README.md'})")
    model = json.loads(summary.read_text()).get("model", {})
    overrides = {k: model[k] for k in ("train_patch_nums", "infer_patch_nums", "image_size") if k in model}
    return tok, bb, overrides


def train_arm(name: str, seed: int, s: DemoSettings, cache: Path, tok: Path, bb: Path, overrides: dict,
              registry, advance) -> tuple[Path, list]:
    from sar_core.config import build_config
    from sar_core.trainer import Trainer

    arm = s.arms[name]
    cfg = build_config({
        "model": {"family": FAMILY, "tokenizer": str(tok), "backbone": str(bb), "overrides": overrides},
        "data": {"name": str(cache), "workers": 0},
        "rollout": arm["rollout"],
        "loss": {**arm.get("loss", {}), "gamma": s.gamma},
        "optim": {"lr": s.lr, "warmup_steps": 0},
        "train": {"steps": s.steps, "batch_size": s.batch_size, "seed": seed, "device": s.device,
                  "save_every": 0, "keep_last": 1, "loggers": ["jsonl"]},
        "out": str(s.out / "runs" / f"{name}-seed{seed}"),
    })
    tracker = _StepProgress(advance)
    registry.pm.register(tracker, name=f"sar-demo-{name}-{seed}")
    try:
        result = Trainer(cfg, registry).run()
    finally:
        registry.pm.unregister(tracker)
    if result.status != "finished":
        raise RuntimeError(f"arm {name} seed {seed} stopped: {result.status} {result.message}")
    return Path(cfg.out) / "backbone.pth", tracker.history


def evaluate(adapter, s: DemoSettings, extractor, reference, val_set, val_codes, seed: int) -> dict:
    from sar_core.diagnostics import exposure_gap
    from sar_core.evaluation import class_accuracy, compute_metrics
    from sar_core.generation import generate_images
    from sar_core.pretrain import Validator

    labels = torch.arange(10).repeat_interleave(s.samples_per_class)
    images = generate_images(adapter, labels, cfg=s.cfg, seed=1000 + seed, batch_size=250)
    m = compute_metrics(images, reference, extractor=extractor, metrics=("fid", "prc"))
    gap = exposure_gap(adapter, val_set, batch_size=256)
    val = _val_loss(adapter, *val_codes)
    return {"fid": m["fid"], "precision": m["precision"], "recall": m["recall"],
            "class_acc": class_accuracy(images, labels, extractor),
            "gap_mean": gap["mean_gap_ce"], "gap": [r["gap_ce"] for r in gap["scales"][1:]],
            "val_loss_tf": val}


@torch.no_grad()
def _val_loss(adapter, codes, labels) -> float:
    from sar_core.losses import teacher_forcing_loss
    from sar_core.tokens import cat_codes

    sched = adapter.default_schedule
    with adapter.inference():
        cond = adapter.condition_from_labels(labels)
        logits = adapter.forward(cond, adapter.teacher_inputs(codes, sched), sched)
    return teacher_forcing_loss(logits, cat_codes(codes), adapter.bits_per_token).item()


def _summary(runs: list[dict]) -> dict:
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {k: {"mean": mean(r[k] for r in runs), "std": pstdev([r[k] for r in runs])} for k in keys}


def run_demo(s: DemoSettings, progress=None, log: Callable[[str], None] = print) -> dict:
    """Train both arms for every seed, evaluate, write the report; return the results."""
    from sar_core.code_cache import build_code_cache
    from sar_core.evaluation import DatasetImages, get_feature_extractor, open_dataset
    from sar_core.generation import balanced_labels, generate_images, load_adapter, save_grid
    from sar_core.plugins import get_registry
    from sar_core.pretrain import encode_split
    from sar_plugins.demo_report import write_report

    t0 = time.time()
    registry = get_registry()
    tok, bb, overrides = _start_files(s.assets)
    s.out.mkdir(parents=True, exist_ok=True)
    start = load_adapter(FAMILY, tok, bb, device=s.device, overrides=overrides)
    schedule = start.default_schedule
    size = start.image_size(schedule)
    train_set, val_set = open_dataset(DATA, "train", size), open_dataset(DATA, "val", size)
    cache = s.out / "code-cache"
    if not (cache / "meta.json").is_file():
        log(f"tokenising the {DATA} train split once into {cache}")
        build_code_cache(start, train_set, schedule, cache)
    val_codes = encode_split(start, val_set, schedule)
    extractor = get_feature_extractor("digit-classifier")
    reference = DatasetImages(train_set)

    total = len(s.seeds) * len(s.arms) * s.steps
    task = progress.add_task("post-training", total=total) if progress else None
    advance = (lambda: progress.advance(task)) if progress else (lambda: None)
    log("evaluating the start model")
    start_metrics = evaluate(start, s, extractor, reference, val_set, val_codes, 0)
    results = {"settings": {"model": "tiny FlexVAR (demo)", "family": FAMILY, "data": f"{DATA} 16x16",
                            "steps": s.steps, "seeds": list(s.seeds), "batch_size": s.batch_size, "lr": s.lr,
                            "samples_per_class": s.samples_per_class, "cfg": s.cfg,
                            "sar": f"ssr over all scales, hard CSFL, gamma {s.gamma}"},
               "start": {"metrics": {k: v for k, v in start_metrics.items() if isinstance(v, float)},
                         "gap": start_metrics["gap"]},
               "arms": {}}
    grid_labels = balanced_labels(100, 10)
    for name in s.arms:
        runs, hist = [], None
        for seed in s.seeds:
            log(f"arm {name}, seed {seed}: {s.steps} steps")
            bb_path, history = train_arm(name, seed, s, cache, tok, bb, overrides, registry, advance)
            hist = hist or history
            adapter = load_adapter(FAMILY, tok, bb_path, device=s.device, overrides=overrides)
            runs.append(evaluate(adapter, s, extractor, reference, val_set, val_codes, seed))
            if seed == s.seeds[0]:
                samples = generate_images(adapter, grid_labels, cfg=s.cfg, seed=7)
                big = torch.nn.functional.interpolate(samples, scale_factor=4, mode="nearest")
                grid = save_grid(big, s.out / f"samples_{name}.png", nrow=10)
        gaps = list(zip(*[r["gap"] for r in runs]))
        results["arms"][name] = {"runs": runs, "summary": _summary(runs), "history": hist,
                                 "gap": {"mean": [mean(g) for g in gaps], "std": [pstdev(g) for g in gaps]},
                                 "grid": str(grid)}
    results["wall_time_s"] = time.time() - t0
    paths = write_report(results, s.out)
    log(f"report: {paths['markdown']} ({results['wall_time_s']:.0f} s)")
    return results
