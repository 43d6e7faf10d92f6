"""Merging user overrides into a family's nested config dict (shared by families whose
config has sub-configs such as ``tokenizer`` and ``backbone``)."""

from __future__ import annotations

from typing import Mapping, Optional

from pydantic import BaseModel


def merge_overrides(cfg: dict, overrides: Optional[dict], sections: Mapping[str, type[BaseModel]],
                    top: Optional[type[BaseModel]] = None) -> dict:
    """A copy of ``cfg`` ({section: {...}, field: value}) with ``overrides`` merged in.

    A key may be a section holding a dict (merged into it), dotted (``backbone.depth``), or a
    bare field name: a field of ``top`` stays top-level, else it goes to the first section
    whose model has that field, else top-level (pydantic then rejects unknown names)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    for name in sections:
        out.setdefault(name, {})
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and key in sections:
            out[key].update(value)
        elif "." in key:
            part, field = key.split(".", 1)
            out.setdefault(part, {})[field] = value
        elif top is not None and key in top.model_fields:
            out[key] = value
        else:
            section = next((s for s, model in sections.items() if key in model.model_fields), None)
            if section is None:
                out[key] = value
            else:
                out[section][key] = value
    return out
