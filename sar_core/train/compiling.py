"""``--compile``: ``torch.compile`` of each transformer block, with dynamic shapes.

Scale-wise models see a new sequence length with every schedule (FlexVAR's random
schedules, Infinity's aspect-ratio templates) and, within one step, passes of different
lengths (teacher pass, student pass, last-scale pass). Compiling the whole backbone would
specialise on the schedule (a Python object whose sides shape every loop) and compile a
graph per schedule. Compiling each block (``Module.compile``, in place: parameter names and
state dicts unchanged) with ``dynamic=True`` instead gives graphs that take the token count
as a symbol, so their number is bounded by the kinds of block call (with or without
gradients, activation checkpointing, prefix keys / values), not by the schedules seen.
Blocks are compiled after activation checkpointing is applied and before DDP / FSDP2 wrap
the backbone (FSDP2 shards the compiled blocks in place).

:func:`compiled_graphs` reads dynamo's count of graphs compiled in this process; the
trainer logs it per step (``compiled_graphs`` in ``metrics.jsonl``) so a run shows whether
compilation settled.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(blocks, backbone: nn.Module, backend: str = "inductor") -> int:
    """Compile every block of ``blocks`` (or the whole ``backbone`` when a family lists none)
    with dynamic shapes; returns the number of modules compiled."""
    blocks = list(blocks)
    for module in blocks or [backbone]:
        module.compile(dynamic=True, backend=backend)
    return len(blocks) or 1


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every backend counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
