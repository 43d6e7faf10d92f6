"""Shipped study presets (``sar study --preset NAME``): YAML files in ``assets/studies/``.

Each preset names its arms and settings and, as default ``families``, the embedded
miniature(s) of ``assets/``; ``sar study --preset NAME --models MODELS.yaml`` runs the
same arms on any registered model instead.
"""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).parent / "assets" / "studies"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown study preset '{name}' (shipped: {', '.join(preset_names())})")
    return path
