"""Shell completion of registry names, presets, paths and ``--set`` keys, without torch.

Names come from :func:`sar_core.plugins.known_names`: the registry when it is already built
in the process, otherwise the ``SAR_NAMES`` each plugin module declares (read from its
source, nothing imported).
"""

from __future__ import annotations

import os
from typing import Callable


def names(kind: str) -> Callable[[str], list[str]]:
    """Typer ``autocompletion`` for a registry kind (adapter, rollout, loss, dataset, ...)."""
    def complete(incomplete: str) -> list[str]:
        from sar_core.plugins import known_names

        return [n for n in known_names(kind) if n.startswith(incomplete)]
    return complete


def paths(incomplete: str) -> list[str]:
    """Files and folders starting with ``incomplete`` (folders end in '/')."""
    head, tail = os.path.split(os.path.expanduser(incomplete))
    try:
        entries = sorted(os.listdir(head or "."))
    except OSError:
        return []
    out = []
    for e in entries:
        if e.startswith(tail) and (tail.startswith(".") or not e.startswith(".")):
            shown = os.path.join(os.path.dirname(incomplete), e)
            out.append(shown + "/" if os.path.isdir(os.path.join(head or ".", e)) else shown)
    return out


def datasets(incomplete: str) -> list[str]:
    """Registered dataset names, ``NAME:`` prefixes, then paths (image folders, code caches)."""
    found = names("dataset")(incomplete)
    return found + [p for p in paths(incomplete) if p not in found]


def presets(incomplete: str) -> list[str]:
    from sar_plugins.studies import preset_names

    return [n for n in preset_names() if n.startswith(incomplete)]


def config_keys() -> list[str]:
    """Every dotted field of the run config (``optim.lr``, ``train.steps``, ...)."""
    from pydantic import BaseModel

    from sar_core.train.config import RunConfig

    out: list[str] = []

    def walk(model, prefix: str) -> None:
        for name, info in model.model_fields.items():
            sub = info.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")
            else:
                out.append(prefix + name)
    walk(RunConfig, "")
    return out


def set_keys(incomplete: str) -> list[str]:
    """``--set`` of ``sar train``: dotted keys followed by '='."""
    if "=" in incomplete:
        return []
    return [k + "=" for k in config_keys() if k.startswith(incomplete)]
