"""``sar pretrain``: build a small scale-wise model from nothing, for demos and tests.

Two stages, both through the adapter contract only:

1. fit the tokenizer (``sar_core.data.tokenizer_fit``) and save it in the family's format;
2. teacher-forcing pretraining of a fresh backbone with the ordinary trainer (rollout
   ``none``), validating the TF loss on a held-out split every ``eval_every`` steps and
   keeping the best backbone (early-stopping selection).

The run folder gets ``tokenizer.pth``, ``backbone.pth`` (best validation TF loss),
``pretrain.json`` (settings, the validation curve, whether it had flattened) and the
trainer's own ``tf/`` folder (metrics.jsonl, config, checkpoints).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from sar_core.checkpoint_io import atomic_write_text
from sar_core.hookspecs import hookimpl
from sar_core.sar.losses import teacher_forcing_loss
from sar_core.tokens import cat_codes
from sar_core.data.tokenizer_fit import fit_tokenizer


class Validator:
    """Run-time plugin: validation TF loss every N steps; keeps the best backbone weights."""

    def __init__(self, trainer, val_codes: list, val_labels: torch.Tensor, every: int, batch: int = 256):
        self.trainer, self.codes, self.labels, self.every, self.batch = trainer, val_codes, val_labels, every, batch
        self.curve: list[dict] = []
        self.best: Optional[dict] = None
        self.best_loss = math.inf

    @torch.no_grad()
    def val_loss(self) -> float:
        tr = self.trainer
        adapter, bb = tr.adapter, tr.backbone
        schedule = tr.sampler.default
        total, n = 0.0, 0
        with adapter.inference():
            for i in range(0, len(self.labels), self.batch):
                codes = [c[i:i + self.batch].to(tr.env.device) for c in self.codes]
                labels = self.labels[i:i + self.batch].to(tr.env.device)
                inputs = adapter.teacher_inputs(codes, schedule)
                logits = bb(adapter.condition_from_labels(labels), inputs, schedule)
                total += teacher_forcing_loss(logits, cat_codes(codes), adapter.bits_per_token).item() * len(labels)
                n += len(labels)
        return total / max(n, 1)

    @hookimpl
    def on_step_end(self, step: int, metrics: dict) -> None:
        if step % self.every and step != self.trainer.total_steps:
            return
        loss = self.val_loss()
        self.curve.append({"step": step, "val_loss_tf": loss, "train_loss_tf": metrics["loss_tf"]})
        if loss < self.best_loss:
            self.best_loss = loss
            self.best = {"step": step, "state": copy.deepcopy(self.trainer.backbone.state_dict())}


def flattened(curve: list[dict], window: float = 0.3, tol: float = 0.01) -> bool:
    """True when the validation loss stopped improving: over the last ``window`` of the
    evaluations the best value improved by less than ``tol`` (relative), or got worse."""
    if len(curve) < 4:
        return False
    k = max(2, int(len(curve) * window))
    before = min(c["val_loss_tf"] for c in curve[:-k])
    after = min(c["val_loss_tf"] for c in curve[-k:])
    return after > before * (1 - tol)


def encode_split(adapter, dataset, schedule, batch_size: int = 256) -> tuple[list, torch.Tensor]:
    from torch.utils.data import DataLoader

    codes, labels = [], []
    with torch.no_grad():
        for images, y in DataLoader(dataset, batch_size=batch_size):
            codes.append([c.cpu() for c in adapter.encode(images.to(adapter.device), schedule)])
            labels.append(torch.as_tensor(y))
    return [torch.cat(parts) for parts in zip(*codes)], torch.cat(labels)


def pretrain(family: str, model: dict[str, Any], data: str, image_size: int, out: Path, *,
             tokenizer_steps: int = 600, tokenizer_lr: float = 2e-3, steps: int = 3000,
             batch_size: int = 64, lr: float = 1e-3, lr_end: Optional[float] = None, warmup_steps: int = 100, eval_every: int = 100,
             seed: int = 0, device: str = "auto", command: str = "", progress=None,
             log: Callable[[str], None] = print) -> dict:
    """Run both stages; return the summary also written to ``out/pretrain.json``."""
    from sar_core.train.config import build_config
    from sar_core.data.datasets import open_dataset
    from sar_core.plugins import get_registry
    from sar_core.train.trainer import Trainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    registry = get_registry()
    cls = registry.get("adapter", family)
    overrides = dict(model)
    for key, value in cls.image_size_overrides((image_size, image_size)).items():
        overrides.setdefault(key, value)
    torch.manual_seed(seed)
    adapter = cls.from_config(cls.config_cls.model_validate(overrides))
    schedule = adapter.default_schedule
    train_set = open_dataset(data, "train", image_size)
    val_set = open_dataset(data, "val", image_size)

    log(f"stage 1: fitting the {family} tokenizer for {tokenizer_steps} steps on {data}")
    fit = fit_tokenizer(adapter, train_set, val_set, schedule, steps=tokenizer_steps,
                        lr=tokenizer_lr, batch_size=batch_size, seed=seed, progress=progress)
    tok_path = out / "tokenizer.pth"
    adapter.save(tok_path, None)
    log(f"tokenizer: val reconstruction MSE {fit.val_recon_mse:.5f}, "
        f"{fit.codes_used_last_scale} codes used at the last scale -> {tok_path}")

    cfg = build_config({
        "model": {"family": family, "tokenizer": str(tok_path), "overrides": overrides},
        "data": {"name": data, "image_size": image_size, "workers": 0},
        "rollout": {"name": "none"},
        "optim": {"lr": lr, "lr_end": lr * 0.01 if lr_end is None else lr_end, "lr_schedule": "cosine", "warmup_steps": warmup_steps},
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "device": device,
                  "save_every": max(steps // 4, 1), "keep_last": 1, "log_every": eval_every,
                  "loggers": ["console", "jsonl"]},
        "eval": {"at_end": False},  # stage 2 is measured below (val loss), not by sar train's evals
        "out": str(out / "tf"),
    })
    trainer = Trainer(cfg, registry)
    val_codes, val_labels = encode_split(trainer.adapter, val_set, trainer.sampler.default)
    validator = Validator(trainer, val_codes, val_labels, eval_every)
    registry.pm.register(validator, name="sar-pretrain-validator")
    log(f"stage 2: teacher-forcing a freshly initialised backbone (pretraining) for {steps} steps "
        f"(validation every {eval_every})")
    try:
        result = trainer.run()
    finally:
        registry.pm.unregister(validator)
    if validator.best is None:
        raise RuntimeError(f"pretraining produced no validated backbone ({result.status}: {result.message})")
    trainer.backbone.load_state_dict(validator.best["state"])
    bb_path = out / "backbone.pth"
    trainer.adapter.save(None, bb_path)
    summary = {
        "family": family, "command": command, "data": data, "image_size": image_size,
        "model": overrides, "schedule": str(schedule), "seed": seed,
        "tokenizer": {"steps": tokenizer_steps, "val_recon_mse": fit.val_recon_mse,
                      "codes_used_last_scale": fit.codes_used_last_scale},
        "backbone": {"steps": result.step, "best_step": validator.best["step"],
                     "best_val_loss_tf": validator.best_loss, "status": result.status},
        "val_curve": validator.curve, "converged": flattened(validator.curve),
    }
    atomic_write_text(json.dumps(summary, indent=2), out / "pretrain.json")
    log(f"backbone: best validation TF loss {validator.best_loss:.4f} at step {validator.best['step']} "
        f"(curve flattened: {summary['converged']}) -> {bb_path}")
    return summary
