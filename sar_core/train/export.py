"""The exported model of a run: the trained backbone (and its EMA) in the family's upstream
layout (``backbone.pth``, ``backbone_ema.pth``), or as plain ``.safetensors``
(``--save-format safetensors``).

:func:`export_backbone` ends a finished run. Under FSDP2 the full weights are gathered once
(every rank takes part) and rank 0 writes them from a plain copy of the model
(:func:`write_exports`), as ``sar export-checkpoint`` does from any run checkpoint, sharded
or not, read whole in one process (:func:`export_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from sar_core.adapter import CheckpointError
from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train.builders import build_adapter
from sar_core.train.config import RunConfig, build_config


def export_backbone(run) -> None:
    """Export ``run``'s (a :class:`~sar_core.train.trainer.Trainer`) backbone; collective."""
    main = run.env.is_main
    fmt = run.config.train.save_format
    if D.is_fsdp(run.backbone):  # gather full weights, export from a plain copy on rank 0
        full = D.model_state(run.backbone)
        ema = run.ema.state_dict()["shadow"] if run.ema is not None else None
        if main:
            write_exports(run.config, run.registry, full, ema, run.adapter.num_classes, run.out_dir, fmt)
    elif main:
        run.adapter.save(None, ckpt.export_path(run.out_dir, "backbone", fmt))
        if run.ema is not None:
            with run.ema.swap_into(run.backbone):
                run.adapter.save(None, ckpt.export_path(run.out_dir, "backbone_ema", fmt))
    D.barrier(run.env)


def write_exports(config: RunConfig, registry, model: dict, ema: Optional[dict], num_classes: Optional[int],
                  out_dir: Path, fmt: str) -> list[Path]:
    """Write ``model`` (a full state dict) and, when given, the EMA weights ``ema`` (a
    parameter subset) as the run's exports in ``out_dir``; returns the paths written."""
    plain = build_adapter(config, registry)
    if num_classes is not None and plain.num_classes != num_classes:  # model.resize_classes
        plain.resize_classes(num_classes)
    written = []
    for name, weights in (("backbone", model), ("backbone_ema", None if ema is None else {**model, **ema})):
        if weights is None:
            continue
        try:
            plain.backbone.load_state_dict(weights)
        except RuntimeError as exc:
            raise CheckpointError(f"the weights do not fit the model the run config builds: "
                                  f"{str(exc).splitlines()[0]}") from exc
        path = ckpt.export_path(out_dir, name, fmt)
        plain.save(None, path)
        written.append(path)
    return written


def resolve(path: Path) -> Path:
    """A run folder -> its newest checkpoint; a checkpoint file or sharded folder -> itself."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not ckpt.is_sharded(path):
        latest = ckpt.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise CheckpointError(f"{path} is a run folder without checkpoints")
        return latest
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def export_checkpoint(path: Path, out_dir: Path, registry, fmt: str = "pt") -> tuple[int, list[Path]]:
    """Export the model (and EMA) of the run checkpoint at ``path`` (see :func:`resolve`)
    into ``out_dir``: (its step, the files written)."""
    state = ckpt.load_full(resolve(path))
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: the checkpoint holds no run config")
    config = build_config(state["config"])
    if config.model.resize_classes:
        raise CheckpointError(f"{path}: a run with model.resize_classes cannot be exported offline (the class "
                              "count comes from its data); its own backbone.pth export has it")
    ema = state.get("ema")
    return int(state["step"]), write_exports(config, registry, state["model"], ema["shadow"] if ema else None, None,
                                             Path(out_dir), fmt)
