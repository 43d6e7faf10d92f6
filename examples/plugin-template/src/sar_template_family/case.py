"""Golden-case support (``sar conformance DIR``, docs/conformance.md): every output the
template computes from a case's inputs, under the keys ``scripts/make_golden_case.py``
records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from sar_core.conformance import CaseRunner
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes, token_ce


class TemplateCaseRunner(CaseRunner):
    def overrides(self, config: dict, case_dir: Optional[Path] = None) -> dict:
        return {}   # the files hold the whole config; read sidecar files of case_dir here if yours do not

    def run(self, adapter, case: dict, config: dict) -> dict:
        schedule = Schedule(config["case"]["sides"])
        images, labels = case["images"].to(adapter.device), case["labels"].to(adapter.device)
        codes = adapter.encode(images, schedule)
        with torch.no_grad():
            logits = adapter.forward(labels, adapter.teacher_inputs(codes, schedule), schedule)
        return {"gt_idx": codes, "tf_logits": logits,
                "tf_loss": token_ce(logits, cat_codes(codes), None).mean()}
