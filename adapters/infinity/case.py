"""Compute every output an Infinity golden case records (keys: tests/fixtures/infinity/README.md).

Inputs: ``images``, the text (``text_kv_compact`` + ``text_lens``, or ``text_padded`` +
``text_mask``), ``scale_schedule`` and, for the BSC example, ``bsc_flip_masks``; settings
from config.json (``case.inference``, ``case.bsc_example``). Sizes come from the files.
``InfinityCaseRunner`` is the family's :class:`sar_core.conformance.CaseRunner`; the kit
runs it in eval mode, dropout 0, float32, with the global RNG seeded 0.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from sar_core.conformance import CaseRunner
from sar_core.sar.losses import teacher_forcing_loss
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes, token_ce

from .sampler import to_uint8_bgr
from .text import padded_to_compact


def case_overrides(config: dict) -> dict:
    out = {}
    if "h_div_w_template" in config:
        out["h_div_w"] = float(config["h_div_w_template"])
    if isinstance(config.get("pn"), str):
        out["pn"] = config["pn"]
    if config.get("scale_schedule"):
        out["schedule"] = [list(s) for s in config["scale_schedule"]]
    return out


class InfinityCaseRunner(CaseRunner):
    """Golden cases of FoundationVision/Infinity (keys: tests/fixtures/infinity/README.md)."""

    def overrides(self, config: dict, case_dir: Optional[Path] = None) -> dict:
        return case_overrides(config)

    def run(self, adapter, case: dict, config: dict) -> dict:
        return run_case(adapter, case, config)


def _schedule(case: dict, adapter) -> Schedule:
    return Schedule(case["scale_schedule"]) if "scale_schedule" in case else adapter.default_schedule


def _text(adapter, case: dict, dev) -> dict:
    if "text_kv_compact" in case:
        kv, lens = case["text_kv_compact"], torch.as_tensor(case["text_lens"])
    else:
        mask = case["text_mask"].bool()
        lens = mask.sum(1)
        kv = padded_to_compact(case["text_padded"], lens)
    return adapter.condition_to(adapter.text_condition(kv.to(dev), lens.to(dev)), dev)


def reweighted_loss(logits, labels, bits: int, schedule: Schedule) -> torch.Tensor:
    """Per-bit CE with weights sqrt(h_K w_K) / sqrt(h_k w_k) per token, normalised to 1."""
    H, W = schedule[-1]
    w = torch.cat([torch.full((n,), (H * W / n) ** 0.5) for n in schedule.token_counts]).to(logits.device)
    w = w / w.sum()
    return (token_ce(logits, labels, bits) * w).sum(-1).mean()


def run_case(adapter, case: dict, config: dict) -> dict:
    dev = adapter.device
    settings = config.get("case", {})
    schedule = _schedule(case, adapter)
    out: dict = {}
    with adapter.inference():
        if "text_kv_compact" in case or "text_padded" in case:
            cond = _text(adapter, case, dev)
            out.update(_text_keys(adapter, cond))
            if "images" in case:
                out.update(_teacher_forcing(adapter, case, cond, schedule, dev))
            out.update(_inference(adapter, cond, schedule, settings.get("inference", {}), dev))
        if "images" in case and ("bsc_flip_masks" in case or "bsc_example" in settings):
            out.update(_bsc(adapter, case, schedule, settings.get("bsc_example", {}), dev))
    return out


def _text_keys(adapter, cond) -> dict:
    bb = adapter.backbone
    with torch.no_grad():
        uncond, _ = bb.text_rows(adapter.null_condition(cond))
        normed = bb.text_norm(cond["kv_compact"])
        cond_BD, (ca_kv, _), _ = bb.encode_text(cond)
    return {"uncond_kv_compact": uncond, "text_normed": normed, "cond_BD": cond_BD, "ca_kv": ca_kv}


def _teacher_forcing(adapter, case, cond, schedule, dev) -> dict:
    bits = adapter.bits_per_token
    images = case["images"].to(dev)
    with torch.no_grad():
        f = adapter.tokenizer.features(images)
        q = adapter.quantise(f, schedule)
        logits = adapter.backbone(cond, q.inputs, schedule)
        labels = cat_codes(q.labels)
        recon = adapter.tokenizer.decode_map(q.fhat.squeeze(2))
    out = {"raw_features": f, "gt_bits": q.labels, "x_BLC_wo_prefix": q.inputs, "fhat": q.fhat,
           "recon": recon, "tf_logits": logits, "tf_loss": teacher_forcing_loss(logits, labels, bits),
           "tf_loss_reweighted": reweighted_loss(logits, labels, bits, schedule)}
    out.update(_train_step(adapter, cond, q.inputs, labels, schedule))
    return out


def _train_step(adapter, cond, inputs, labels, schedule) -> dict:
    """Upstream's train_step on this batch (eval mode, no cond-drop, BSC off): loss and the
    pre-clip total gradient norm, on a copy of the backbone."""
    model = copy.deepcopy(adapter.backbone)
    model.zero_grad(set_to_none=True)
    loss = teacher_forcing_loss(model(cond, inputs, schedule), labels, adapter.bits_per_token)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, 5.0)
    return {"train_step_loss": loss.detach(), "train_step_grad_norm": norm.detach()}


def _inference(adapter, cond, schedule, s: dict, dev) -> dict:
    gen = torch.Generator(device=dev).manual_seed(int(s["g_seed"])) if s.get("g_seed") is not None else None
    res = adapter.generate(cond, schedule, cfg=float(s.get("cfg", 3.0)), top_k=int(s.get("top_k", 900)),
                           top_p=float(s.get("top_p", 0.97)), generator=gen, tau=float(s.get("tau", 0.5)),
                           cfg_insertion_layer=int(s.get("cfg_insertion_layer", 0)))
    return {"infer_bits": res.codes, "infer_logits": res.guided_logits, "infer_summed_codes": res.summed_codes,
            "infer_image": res.raw_images, "infer_image_uint8_bgr": to_uint8_bgr(res.raw_images)}


def _bsc(adapter, case, schedule, s: dict, dev) -> dict:
    images = case["images"].to(dev)
    masks = case.get("bsc_flip_masks")
    c = adapter.config
    layers = len(masks) if masks is not None else int(s.get("noise_apply_layers", c.bsc_layers))
    strength = float(s.get("noise_apply_strength", c.bsc_strength))
    requant = bool(s.get("noise_apply_requant", c.bsc_requant))
    with torch.no_grad():
        f = adapter.tokenizer.features(images)
        if masks is None:  # inputs only: draw the masks as upstream does (numpy + torch CPU RNGs)
            np.random.seed(int(s.get("np_seed", 0)))
            torch.manual_seed(int(s.get("torch_seed", 0)))
        from .bsq import multiscale
        q = multiscale(f, schedule, masks, layers, strength, requant)
    return {"bsc_x_BLC_wo_prefix": q.inputs, "bsc_gt_bits": q.labels, "bsc_flip_masks": q.flip_masks}
