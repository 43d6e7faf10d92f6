"""Weight init and weight-decay exclusions shared by the AdaLN transformers (VAR, FlexVAR)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

#: parameter-name fragments upstream excludes from weight decay (besides 1-D params)
NO_DECAY_KEYWORDS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                     "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                     "scale_mul")


@torch.no_grad()
def init_adaln_transformer(model: nn.Module, std: float, positions: Sequence[tuple[nn.Parameter, float]],
                           init_head: float, init_adaln: float, init_adaln_gamma: float) -> None:
    """Upstream's recipe: truncated-normal linears / embeddings (linear biases 0), then
    ``positions`` ((parameter, std) pairs, in order), a small head, near-identity AdaLN gates, and residual projections scaled
    by 1 / sqrt(2 * depth). ``model`` has ``C``, ``blocks``, ``head`` and ``head_nm``."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
    for p, p_std in positions:
        nn.init.trunc_normal_(p, std=p_std)
    model.head.weight.mul_(init_head)
    model.head_nm.ada_lin[-1].weight.mul_(init_adaln)
    depth = max(len(model.blocks), 1)
    C = model.C
    for block in model.blocks:
        block.attn.proj.weight.div_(math.sqrt(2 * depth))
        block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
        if hasattr(block, "ada_lin"):
            w = block.ada_lin[-1].weight
            w[2 * C:].mul_(init_adaln)
            w[:2 * C].mul_(init_adaln_gamma)
        else:
            block.ada_gss[:, :, 2:].mul_(init_adaln)
            block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
