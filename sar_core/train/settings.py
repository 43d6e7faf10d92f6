"""The one line a run prints first: what it trains with, ``(default)`` after each value that
neither the config file nor a flag set (README "Defaults of `sar train`").

    settings: lr 2.04e-05 (default: 1e-4 * sqrt(B / 768) at B = 32), global batch 32 (default),
    1000 steps (default), rollout ssr (default) over all scales (default), CSF loss hard (default),
    gamma 0.5 (default)

A resumed run reads its own ``config.yaml``, so its values are all the run's (no marks).
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from sar_core.train.config import LR_RULE, RunConfig


def _mark(section: BaseModel, name: str, text: str) -> str:
    return text if name in section.model_fields_set else f"{text} (default)"


def settings_line(cfg: RunConfig, rollout_scales: Optional[str] = None) -> str:
    """``cfg``'s line; ``rollout_scales``: the built rollout's own where the config leaves it."""
    o, r, loss, t = cfg.optim, cfg.rollout, cfg.loss, cfg.train
    lr = f"lr {o.lr:.3g}" + ("" if "lr" in o.model_fields_set else f" (default: {LR_RULE} at B = {t.batch_size})")
    parts = [lr, _mark(t, "batch_size", f"global batch {t.batch_size}"), _mark(t, "steps", f"{t.steps} steps")]
    rollout = _mark(r, "name", f"rollout {r.name}")
    scales = r.scales or rollout_scales
    if r.name != "none" and scales:
        rollout += " " + _mark(r, "scales", f"over {scales} scales")
    if r.name != "none" and (r.depth or 1) > 1:
        rollout += f" at depth {r.depth}"
    parts.append(rollout)
    if r.name != "none":
        parts += [_mark(loss, "name", f"CSF loss {loss.name}"), _mark(loss, "gamma", f"gamma {loss.gamma:g}")]
    return "settings: " + ", ".join(parts)
