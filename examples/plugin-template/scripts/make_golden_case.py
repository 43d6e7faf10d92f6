"""Make a golden case for the template family (format: sar's docs/conformance.md).

    python scripts/make_golden_case.py OUT_DIR
    sar conformance OUT_DIR

A real golden case runs your family's *upstream* code, in the upstream code's
environment, and records what it computes. This skeleton marks the two places to replace
with ``UPSTREAM:``; the template's own modules stand in for the upstream model so the
script runs as is (the tests of this package run it). The rest is the recipe:

1. build the upstream model at a tiny size;
2. liven it: re-draw every backbone parameter with a seeded generator, at a scale where
   each block changes the logits far more than the tolerances (upstream inits make blocks
   near-identity, and a case recorded from them passes adapters with bugs inside blocks);
3. check it: skipping any one block must change the teacher-forced logits by > 1e-2;
4. save the weights in the upstream release's layout and record inputs and outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sar_core.adapter import liven_parameters   # the contract suite's rule; or copy its few lines
from sar_core.checkpoint_io import atomic_save
from sar_core.schedule import Schedule
from sar_core.tokens import cat_codes, token_ce

SIDES = (1, 2, 3, 4)
BLOCK_EFFECT = 1e-2


def build_upstream(seed: int = 0):
    """UPSTREAM: build your upstream tokenizer and transformer here (tiny sizes)."""
    from sar_template_family.adapter import TemplateAdapter, TemplateConfig

    torch.manual_seed(seed)
    return TemplateAdapter.from_config(TemplateConfig(sides=SIDES))


def upstream_outputs(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """UPSTREAM: call the upstream code's own encode / teacher-forced forward here, in eval
    mode with condition dropout 0 and float32, and return its outputs under your keys."""
    schedule = Schedule(SIDES)
    codes = model.encode(images, schedule)
    with torch.no_grad():
        logits = model.forward(labels, model.teacher_inputs(codes, schedule), schedule)
    return {"gt_idx": codes, "tf_logits": logits, "tf_loss": token_ce(logits, cat_codes(codes), None).mean()}


def block_effects(model, blocks, images, labels) -> list[float]:
    """How much skipping each block (a hook returning its input) moves the TF logits."""
    ref = upstream_outputs(model, images, labels)["tf_logits"]
    out = []
    for block in blocks:
        handle = block.register_forward_hook(lambda m, args, output: args[0])
        try:
            out.append(float((upstream_outputs(model, images, labels)["tf_logits"] - ref).abs().max()))
        finally:
            handle.remove()
    return out


def make_case(out: Path, seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_upstream(seed)
    liven_parameters(model.backbone, torch.Generator().manual_seed(seed))   # step 2
    model.backbone.eval()
    g = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(2, 3, 2 * SIDES[-1], 2 * SIDES[-1], generator=g) * 2 - 1
    labels = torch.tensor([3, 7])
    effects = block_effects(model, model.backbone.blocks, images, labels)  # step 3
    if min(effects) <= BLOCK_EFFECT:
        raise SystemExit(f"a block barely matters ({min(effects):.2e}): liven the weights at a larger scale")
    model.save(out / "tokenizer.pth", out / "backbone.pth")                # step 4, UPSTREAM: its layout
    atomic_save({"images": images, "labels": labels, **upstream_outputs(model, images, labels)}, out / "case.pt")
    config = {"family": "template",
              "files": {"tokenizer": "tokenizer.pth", "backbone": "backbone.pth", "case": "case.pt"},
              "case": {"sides": list(SIDES), "labels": labels.tolist(), "seed": seed,
                       "weights": "upstream init, then liven_parameters (seed above)",
                       "block_effects": effects}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/make_golden_case.py OUT_DIR")
    print(f"wrote {make_case(Path(sys.argv[1]))}")
