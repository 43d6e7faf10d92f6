"""``--compile``: ``torch.compile`` of each transformer block's forward, with dynamic shapes.

Scale-wise models see a new sequence length with every schedule (FlexVAR's random
schedules, Infinity's aspect-ratio templates) and, within one step, passes of different
lengths (teacher pass, student pass, last-scale pass). Compiling the whole backbone would
specialise on the schedule (a Python object whose sides shape every loop) and compile a
graph per schedule. Compiling each block with ``dynamic=True`` instead gives graphs that
take the token count as a symbol, so their number is bounded by the kinds of block call
(with or without gradients, activation checkpointing, prefix keys / values), not by the
schedules seen.

What is compiled is the block's ``forward`` (an instance attribute, so parameter names and
state dicts are unchanged), not its ``__call__`` (``Module.compile``): module hooks run
outside the compiled region. This matters under FSDP2, whose ``fully_shard`` hooks
(parameter all-gather before a block, reshard after) are excluded from dynamo tracing: a
compiled ``__call__`` breaks its graph at the hook and, on torch 2.14, then ran the block
eagerly without a word. Order (the trainer's): activation checkpointing wraps ``forward``
first (the checkpoint is traced as part of the compiled forward), then the blocks are
compiled, then DDP / FSDP2 wrap the backbone (FSDP2 shards the compiled blocks in place).
Tested with 2 gloo ranks under DDP and FSDP2 (``tests/test_compile_dist.py``).

:func:`compiled_graphs` reads dynamo's count of graphs compiled in this process; the
trainer logs it per step (``compiled_graphs`` in ``metrics.jsonl``) so a run shows whether
compilation settled.
"""

from __future__ import annotations

import torch
from torch import nn


def compile_blocks(blocks, backbone: nn.Module, backend: str = "inductor") -> int:
    """Compile the forward of every block of ``blocks`` (or the whole ``backbone`` when a
    family lists none) with dynamic shapes, in place; returns the number of modules
    compiled. Apply activation checkpointing before (it re-sets ``forward``)."""
    blocks = list(blocks)
    for module in blocks or [backbone]:
        if "_sar_eager_forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} is compiled already")
        eager = module.forward  # the class's forward or activation checkpointing's wrapper
        module.__dict__["_sar_eager_forward"] = eager
        module.forward = torch.compile(eager, dynamic=True, backend=backend)
    return len(blocks) or 1


def is_compiled(module: nn.Module) -> bool:
    return "_sar_eager_forward" in module.__dict__


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every backend counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
