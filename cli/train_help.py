"""``sar train --help``: panels, defaults, help texts and ``SAR_*`` variables for its flags.

The defaults of ``sar train`` live in the run config (:mod:`sar_core.train.config`), so its flags
default to None (a flag given wins over the config file). This module fills in what
``--help`` shows from that one source: each flag's default (the config field's), its help
text (the field's description where the flag has none), a rich panel, and the ``SAR_*``
environment variable of the common options. Precedence: flag > ``SAR_*`` variable >
``--config`` file > default.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

PANELS = {
    "Model": ("family", "tokenizer", "random_tokenizer", "backbone", "schedule", "cond_drop", "resize_classes",
              "null_payload"),
    "Data": ("data", "split", "image_size", "workers", "class_map"),
    "Optimizer": ("steps", "batch_size", "grad_accum", "lr", "lr_end", "lr_schedule", "warmup_steps",
                  "weight_decay", "betas", "grad_clip", "ema", "amp", "compile_model", "seed"),
    "SAR rollout and loss": ("rollout", "ssr_scales", "ssr_depth", "rollout_sampling", "rollout_top_k",
                             "rollout_top_p", "rollout_cfg", "csfl", "csfl_temperature", "gamma", "label_smoothing"),
    "Run folder, checkpoints and logs": ("out", "resume", "restart", "accept_data_change", "save_every",
                                         "save_format", "keep_last", "log_every",
                                         "max_nonfinite", "loggers"),
    "Validation during training": ("eval_every", "eval_at_end", "val_data", "eval_images", "eval_samples",
                                   "feature_extractor", "feature_weights"),
    "Devices": ("device", "dist"),
    "Config": ("config", "print_config", "sets"),
}

#: flags that also read a ``SAR_*`` environment variable
ENV = {name: f"SAR_{name.upper()}" for name in (
    "config", "family", "tokenizer", "backbone", "data", "image_size", "workers", "batch_size", "steps",
    "out", "device", "loggers", "dist", "seed", "eval_at_end")}

#: help texts for flags whose config field has no description
EXTRA_HELP = {
    "split": "Dataset split; of an image folder its <split> sub-folder ('.': the folder itself).",
    "warmup_steps": "Linear warm-up steps.", "weight_decay": "AdamW weight decay.",
    "rollout_top_k": "Top-k of a sampled rollout (0: off).", "rollout_top_p": "Top-p of a sampled rollout (0: off).",
    "label_smoothing": "Label smoothing of the teacher-forcing loss.", "seed": "Seed of weights, data order, rollouts.",
    "log_every": "Console line every N steps.", "keep_last": "Checkpoints to keep.",
    "device": "auto | cpu | cuda | cuda:1 ...", "dist": "ddp | fsdp (under torchrun).",
}


def field_info(dotted: str):
    """The pydantic FieldInfo of a dotted run-config field (``optim.lr``), or None."""
    from pydantic import BaseModel

    from sar_core.train.config import RunConfig

    model: Any = RunConfig
    info = None
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation
    return info


#: what a None default means, per field
NONE_TEXT = {
    "model.tokenizer": "none: required unless --random-tokenizer", "model.backbone": "none: a fresh backbone (pretraining)",
    "model.schedule": "the model's", "model.cond_drop": "the backbone's", "data.image_size": "the model's",
    "optim.lr": "1e-4 * sqrt(B / 768)", "rollout.scales": "the rollout's (ssr: all)",
    "optim.lr_end": "none", "optim.lr_schedule": "linear with --lr-end, else constant",
    "loss.temperature": "the loss's", "dist.backend": "nccl on CUDA, gloo on CPU",
    "model.null_payloads": "the data's own", "eval.data": "the --data's val split",
    "eval.at_end": "on when validation data exists",
}


def default_text(dotted: str) -> str | None:
    info = field_info(dotted)
    if info is None or info.is_required():
        return None
    value = info.get_default(call_default_factory=True)
    if value is None or value == {}:
        return NONE_TEXT.get(dotted, "the rollout's" if dotted.startswith("rollout.") else "none")
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def decorate(fn: Callable, flag_fields: dict[str, str]) -> Callable:
    """Fill panels, shown defaults, missing help texts and env vars of ``fn``'s typer options."""
    panel_of = {name: panel for panel, names in PANELS.items() for name in names}
    for name, param in inspect.signature(fn).parameters.items():
        opt = param.default
        if not hasattr(opt, "rich_help_panel"):
            continue
        opt.rich_help_panel = panel_of.get(name, "Other")
        dotted = flag_fields.get(name)
        if dotted and opt.default is None:
            shown = default_text(dotted)
            if shown is not None:
                opt.show_default = shown
        if not opt.help:
            info = field_info(dotted) if dotted else None
            text = EXTRA_HELP.get(name) or (info.description if info is not None else None)
            opt.help = (text[0].upper() + text[1:].rstrip(".") + ".") if text else None
        if name in ENV:
            opt.envvar = ENV[name]
    return fn
