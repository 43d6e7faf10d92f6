"""VAR golden cases (see tests/fixtures/var/README.md): every key computable from a case's
inputs. The conformance kit pins eval mode, condition dropout 0 and float32 around it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from sar_core.conformance import CaseRunner
from sar_core.tokens import cat_codes, mean_token_loss, token_ce

from .config import VARConfig
from .sampler import generate as var_generate

#: config.json sections whose fields map onto VARConfig
CASE_SECTIONS = ("tokenizer", "backbone")


class VARCaseRunner(CaseRunner):
    def overrides(self, config: dict, case_dir: Optional[Path] = None) -> dict:
        """Hyper-parameters a golden case's config.json states (those not in tensor shapes
        included: quant_resi, using_znorm, norm_eps, patch_nums...)."""
        fields = VARConfig.model_fields
        out: dict = {}
        for section in CASE_SECTIONS:
            for key, value in (config.get(section) or {}).items():
                if key in fields and isinstance(value, (bool, int, float, list, tuple)):
                    out[key] = tuple(value) if isinstance(value, list) else value
        if isinstance(config.get("patch_nums"), list):
            out["patch_nums"] = tuple(config["patch_nums"])
        return out

    @torch.no_grad()
    def run(self, adapter, case: dict, config: dict) -> dict:
        out: dict = {}
        sched, dev = adapter.default_schedule, adapter.device
        if "images" in case:
            _tokenizer(adapter, case, sched.sides, dev, out)
            if "labels" in case:
                logits = adapter.backbone(case["labels"].to(dev), out["x_BLCv_wo_first_l"], sched)
                out["tf_logits"] = logits
                out["tf_loss"] = mean_token_loss(token_ce(logits, out["gt_idx_cat"], None))
        inference = (config.get("case") or {}).get("inference") or {}
        labels = case.get("infer_labels", inference.get("labels"))
        if labels is not None:
            _inference(adapter, torch.as_tensor(labels), inference, dev, out)
        return out


def _tokenizer(adapter, case: dict, sides: tuple, dev: torch.device, out: dict) -> None:
    tok = adapter.tokenizer
    f = tok.encode_f(case["images"].to(dev))
    idx, f_hats = tok.quantize_f(f, sides)
    out["enc_f"] = f
    out["gt_idx"] = idx
    out["gt_idx_cat"] = cat_codes(idx)
    out["f_hat_per_scale"] = f_hats
    out["x_BLCv_wo_first_l"] = tok.teacher_inputs(idx, sides)
    out["recon_img"] = tok.decode(idx, sides)


def _inference(adapter, labels: torch.Tensor, inference: dict, dev: torch.device, out: dict) -> None:
    gen = None
    if inference.get("g_seed") is not None:
        gen = torch.Generator(device=dev).manual_seed(int(inference["g_seed"]))
    res = var_generate(adapter.backbone, adapter.tokenizer, labels.to(dev), cfg=float(inference.get("cfg", 1.5)),
                       top_k=int(inference.get("top_k", 0)), top_p=float(inference.get("top_p", 0.0)),
                       generator=gen, more_smooth=bool(inference.get("more_smooth", False)))
    out["infer_idx"] = res.codes
    out["infer_logits_cfg"] = res.guided_logits
    out["infer_img"] = res.images
