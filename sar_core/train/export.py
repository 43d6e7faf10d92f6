"""The end of a finished run: the trained backbone (and its EMA) written in the family's
upstream layout (``backbone.pth``, ``backbone_ema.pth``), or as plain ``.safetensors``
(``--save-format safetensors``). Under FSDP2 the full weights are gathered (every rank
takes part) and rank 0 writes them from a plain copy of the model."""

from __future__ import annotations

from sar_core.train import checkpointing as ckpt
from sar_core.train import distributed as D
from sar_core.train.builders import build_adapter


def export_backbone(run) -> None:
    """Export ``run``'s (a :class:`~sar_core.train.trainer.Trainer`) backbone; collective."""
    main = run.env.is_main
    fmt = run.config.train.save_format
    bb_path, ema_path = ckpt.export_path(run.out_dir, "backbone", fmt), ckpt.export_path(run.out_dir, "backbone_ema", fmt)
    if D.is_fsdp(run.backbone):  # gather full weights, export from a plain copy on rank 0
        full = D.model_state(run.backbone)
        ema = run.ema.state_dict()["shadow"] if run.ema is not None else None
        if main:
            plain = build_adapter(run.config, run.registry)
            if plain.num_classes != run.adapter.num_classes:  # model.resize_classes
                plain.resize_classes(run.adapter.num_classes)
            plain.backbone.load_state_dict(full)
            plain.save(None, bb_path)
            if ema is not None:
                plain.backbone.load_state_dict({**full, **ema})
                plain.save(None, ema_path)
    elif main:
        run.adapter.save(None, bb_path)
        if run.ema is not None:
            with run.ema.swap_into(run.backbone):
                run.adapter.save(None, ema_path)
    D.barrier(run.env)
