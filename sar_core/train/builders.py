"""Builders of a training run: seeds, the adapter (with its null payloads), rollout / loss,
schedule sampler, the data's condition payloads and the pixel size of training images
checked against the model.

Re-exported by :mod:`sar_core.train.trainer` (``from sar_core.train.trainer import build_adapter``
keeps working)."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch

from sar_core.train.config import RunConfig
from sar_core.data.datasets import image_hw, is_code_cache, open_training_data
from sar_core.data.payloads import check_dataset_payloads, provide_null_payloads, read_null_payloads
from sar_core.schedule import Schedule, ScheduleSampler


def derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- builders
def build_adapter(cfg: RunConfig, registry) -> Any:
    """Load (or, without checkpoint files, build from ``model.overrides``) the adapter."""
    cls = registry.get("adapter", cfg.model.family)
    overrides = dict(cfg.model.overrides)
    if cfg.data.image_size is not None:
        for key, value in cls.image_size_overrides(image_hw(cfg.data.image_size)).items():
            overrides.setdefault(key, value)
    if cfg.model.tokenizer is None and cfg.model.backbone is None:
        adapter = cls.from_config(cls.config_cls.model_validate(overrides))
    else:
        adapter = cls.load(cfg.model.tokenizer, cfg.model.backbone, overrides=overrides or None)
    if cfg.model.null_payloads:
        adapter.set_null_payloads(read_null_payloads(cfg.model.null_payloads))
    return adapter


def prepare_conditions(cfg: RunConfig, adapter, dataset, log) -> None:
    """Before the first step: the data's condition payloads against what the adapter reads,
    and its encoder-derived null payloads (``model.null_payloads``, else the data's own)."""
    check_dataset_payloads(adapter, dataset, f"--data {cfg.data.name}")
    taken = provide_null_payloads(adapter, dataset, bool(cfg.model.null_payloads))
    if taken:
        log(f"null payloads {', '.join(taken)}: the data's own (its encoder's features of the empty prompt)")


def build_schedule_sampler(adapter, spec: Optional[str], seed: int, registry) -> ScheduleSampler:
    """None: the adapter's; a registered schedule sampler name; or sides like 1_2_3_4."""
    if spec is None:
        return adapter.schedule_sampler(seed)
    if spec in registry.names("schedule"):
        return registry.get("schedule", spec)(adapter.default_schedule, seed)
    try:
        schedule = Schedule.parse(spec)
    except ValueError:
        known = ", ".join(registry.names("schedule")) or "none"
        raise ValueError(f"model.schedule {spec!r} is neither a schedule like 1_2_3_4 nor a registered "
                         f"schedule sampler ({known})") from None
    return ScheduleSampler(schedule, seed)


def build_rollout_and_loss(cfg: RunConfig, registry, schedule: Optional[Schedule] = None) -> tuple[Any, Any]:
    """The run's rollout and CSF loss; the rollout checks the default training ``schedule``."""
    rollout_cls = registry.get("rollout", cfg.rollout.name)
    loss_cls = registry.get("loss", cfg.loss.name)
    try:
        rollout = rollout_cls(**cfg.rollout.options())
        if schedule is not None and hasattr(rollout, "check_schedule"):
            rollout.check_schedule(schedule)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"rollout '{cfg.rollout.name}': {exc}") from None
    try:
        loss = loss_cls(**cfg.loss.options())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"loss '{cfg.loss.name}': {exc}") from None
    return rollout, loss


def data_image_size(cfg: RunConfig, adapter, sampler: ScheduleSampler) -> tuple[int, int]:
    """Pixel (H, W) of training images; checked against what the model encodes."""
    natural = image_hw(adapter.training_image_size(sampler))
    if cfg.data.image_size is not None and image_hw(cfg.data.image_size) != natural:
        asked = "x".join(map(str, image_hw(cfg.data.image_size)))
        raise ValueError(f"--image-size {asked} does not match the model: family "
                         f"'{adapter.name}' with schedule {sampler.default} encodes {natural[0]}x{natural[1]} "
                         "images (change the schedule or the image size)")
    return natural


def open_run_data(cfg: RunConfig, adapter, sampler: ScheduleSampler, registry) -> tuple[Any, Optional[tuple]]:
    """(the training dataset, the pixel (H, W) its images are trained at; None for a code cache)."""
    if is_code_cache(cfg.data.name):
        if type(sampler) is not ScheduleSampler:
            raise ValueError("a code cache holds one schedule; a random training schedule needs images")
        return open_training_data(cfg.data.name, cfg.data.split, None, cfg.data.options, registry,
                                  adapter, sampler.default), None
    size = data_image_size(cfg, adapter, sampler)
    train_hw, options = tuple(size), dict(cfg.data.options)
    sizes = adapter.training_image_sizes(sampler)
    if len(sizes) > 1 and cfg.data.image_size is None:  # mixed aspect ratios may be bucketed
        options.setdefault("image_sizes", [list(hw) for hw in sizes])
    return open_training_data(cfg.data.name, cfg.data.split, size, options, registry), train_hw
