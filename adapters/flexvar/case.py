"""Compute every output a FlexVAR golden case records (see tests/fixtures/flexvar/README.md).

Inputs only: images, labels, tf_patch_nums, infer_patch_nums, infer_labels,
schedule_seeds from case.pt, and the recorded run's settings from config.json. The SAR
keys go through the family-agnostic core (``sar_core.sar.step`` with the ``official``
rollout and the ``hard`` CSF loss), on a copy of the backbone so the adapter is untouched.
The conformance kit pins eval mode, condition dropout 0 and float32 around the runner.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Optional

import torch

from sar_core.conformance import CaseRunner
from sar_core.sar.losses import HardCSFL, NaiveStudentForcing, teacher_forcing_loss
from sar_core.sar.rollouts import OfficialRollout
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes

from .schedules import draw_patch_nums


def _sides(value) -> list[int]:
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]


class FlexVARCaseRunner(CaseRunner):
    def overrides(self, config: dict, case_dir: Optional[Path] = None) -> dict:
        """Heads cannot be read from a checkpoint without ``scale_mul_1H11``: take them
        from config.json when it names them."""
        heads = config.get("backbone", {}).get("num_heads")
        return {"backbone.num_heads": int(heads)} if isinstance(heads, int) else {}

    def run(self, adapter, case: dict, config: dict) -> dict:
        dev = adapter.device
        settings = config.get("case", {})
        bb = adapter.backbone
        out: dict = {}
        if "images" in case and "tf_patch_nums" in case:
            out.update(_teacher_forcing(adapter, bb, case, dev))
        if "infer_patch_nums" in case and "infer_labels" in case:
            runs = [(p, k) for p, k in (("infer", "inference"), ("infer_llamagen", "inference_llamagen_cfg"))
                    if k in settings] or [("infer", "inference")]   # no settings: upstream defaults
            for prefix, key in runs:
                out.update(_inference(adapter, case, settings.get(key, {}), prefix, dev))
        if "images" in case and "tf_patch_nums" in case and "sar_csfl" in settings:
            out.update(_sar(adapter, bb, case, settings["sar_csfl"], dev))
        if "schedule_seeds" in case:
            out["schedule_samples"] = [draw_patch_nums(random.Random(int(s))) for s in case["schedule_seeds"]]
        return out


def _teacher_forcing(adapter, bb, case, dev) -> dict:
    schedule = Schedule(_sides(case["tf_patch_nums"]))
    images, labels = case["images"].to(dev), case["labels"].to(dev)
    with torch.no_grad():
        enc_h = adapter.tokenizer.encode_latent(images)
        gt = adapter.tokenizer.quantize_scales(enc_h, list(schedule))
        x = adapter.teacher_inputs(gt, schedule)
        logits = bb(labels, x, schedule)
        loss = teacher_forcing_loss(logits, cat_codes(gt), None)
        recon = adapter.decode_raw(gt, schedule)
    return {"enc_h": enc_h, "gt_idx": gt, "gt_idx_cat": cat_codes(gt), "x_BLCv_wo_first_l": x,
            "tf_logits": logits, "tf_loss": loss, "recon_img": recon}


def _inference(adapter, case, s: dict, prefix: str, dev) -> dict:
    sides = _sides(s.get("patch_nums", case["infer_patch_nums"]))
    labels = torch.as_tensor(s.get("labels", case["infer_labels"])).to(dev)
    gen = None
    seed = s.get("g_seed")
    if seed is not None:
        gen = torch.Generator(device=dev).manual_seed(int(seed))
    if s.get("more_smooth", False):
        raise ValueError("FlexVAR's sampler asserts more_smooth=False")
    res = adapter.generate(labels, Schedule(sides), cfg=float(s.get("cfg", 1.0)),
                           top_k=int(s.get("top_k", 0)), top_p=float(s.get("top_p", 0.0)),
                           generator=gen, max_pn=int(s.get("max_pn", 16)),
                           used_llamagen_cfg=bool(s.get("used_llamagen_cfg", prefix != "infer")))
    return {f"{prefix}_idx": res.codes, f"{prefix}_logits_cfg": res.guided_logits,
            f"{prefix}_img": res.raw_images}


def _sar(adapter, bb, case, s: dict, dev) -> dict:
    schedule = Schedule(_sides(case["tf_patch_nums"]))
    images, labels = case["images"].to(dev), case["labels"].to(dev)
    gt = adapter.encode(images, schedule)
    gamma = float(s.get("sigma", 0.01))
    ls = float(s.get("label_smooth", 0.0))
    # 'csfl' supervises the student pass with the teacher's prediction, the other official
    # mode ('tf_then_single_sf') with ground truth
    loss = NaiveStudentForcing() if s.get("training_mode") == "tf_then_single_sf" else HardCSFL()
    out = {}
    argmax = s.get("argmax_variant")
    if argmax is not None:
        rollout = OfficialRollout(sampling="argmax", upstream_exact=True)
        out.update(_sar_variant(adapter, bb, labels, gt, schedule, rollout, loss, gamma, ls, None, "sar"))
    sampled = s.get("sampled_variant")
    if sampled is not None and sampled.get("sf_use_sampling", True):
        rollout = OfficialRollout(sampling="sample", top_k=int(sampled.get("sf_top_k", 900)),
                                  top_p=float(sampled.get("sf_top_p", 0.96)),
                                  cfg=float(sampled.get("sf_cfg_scale", 1.2)), upstream_exact=True)
        gen = torch.Generator(device=dev)  # upstream never seeds it: the default seed
        res = _sar_variant(adapter, bb, labels, gt, schedule, rollout, loss, gamma, ls, gen, "sar_sampled")
        res["sar_sampled_tf_labels"] = adapter.cfg_condition(labels) if rollout.uses_cfg else labels
        res["sar_sampled_rng_seed"] = gen.initial_seed()
        out.update(res)
    return out


def _sar_variant(adapter, bb, labels, gt, schedule, rollout, loss, gamma, ls,
                 gen: Optional[torch.Generator], prefix: str) -> dict:
    model = copy.deepcopy(bb)
    model.zero_grad(set_to_none=True)
    res = sar_step(adapter, model, labels, gt, schedule, rollout, loss, gamma, ls, gen)
    res.total.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    out = {f"{prefix}_tf_loss": res.loss_tf.detach(), f"{prefix}_sf_loss": res.loss_csf.detach(),
           f"{prefix}_total_loss": res.total.detach(), f"{prefix}_grad_norm": grad_norm.detach()}
    sp = res.student
    if sp is not None:
        cur, nxt = sp.extras["sf_scales"]
        out.update({f"{prefix}_sf_scales": torch.tensor([cur[0], nxt[0]]),
                    f"{prefix}_sf_input": sp.inputs, f"{prefix}_sf_logits": sp.logits.detach()})
        if rollout.sampling == "argmax":
            out.update({f"{prefix}_sf_input_idx": sp.extras["sf_input_codes"],
                        f"{prefix}_sf_target": (sp.gt_codes if isinstance(loss, NaiveStudentForcing)
                                                else sp.teacher_codes)})
        else:
            out[f"{prefix}_rollout_idx"] = list(res.pred_codes)
    return out
