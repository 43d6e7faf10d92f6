"""Helpers of the contract suite, also for authors' own tests: random / wrong codes of a
code space, the input slice of a scale, random batches (class labels, text features, or
every payload an adapter declares), random null payloads, and a context that pins train
mode and condition dropout."""

from __future__ import annotations

import contextlib

import torch

from sar_core.adapter import CodeSpace, ScaleWiseAdapter
from sar_core.batch import Batch, Padded
from sar_core.schedule import Schedule


def code_shape(code_space: CodeSpace, batch_size: int, tokens: int) -> tuple[int, ...]:
    """Shape of one scale's codes: (B, n) for index codes, (B, n, d) for bitwise codes."""
    return (batch_size, tokens) + ((int(code_space.bits),) if code_space.bitwise else ())


def random_codes(code_space: CodeSpace, schedule: Schedule, batch_size: int,
                 generator: torch.Generator) -> list:
    """Uniformly random valid codes for every scale of ``schedule``."""
    high = 2 if code_space.bitwise else int(code_space.vocab_size)
    return [torch.randint(0, high, code_shape(code_space, batch_size, n), generator=generator)
            for n in schedule.token_counts]


def wrong_codes(codes: torch.Tensor, code_space: CodeSpace) -> torch.Tensor:
    """Codes that differ from ``codes`` at every token (every bit flipped / next index)."""
    if code_space.bitwise:
        return 1 - codes
    return (codes + 1) % int(code_space.vocab_size)


def input_slice(schedule: Schedule, k: int) -> slice:
    """Where scale ``k``'s inputs (k >= 1) sit in a (B, L - first_len, C) input tensor."""
    first = schedule.first_len
    return slice(schedule.offsets[k] - first, schedule.offsets[k + 1] - first)


def random_images(adapter: ScaleWiseAdapter, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [-1, 1] at the size the adapter trains at (any aspect ratio)."""
    h, w = adapter.training_image_size(adapter.schedule_sampler())
    return torch.rand(batch_size, 3, int(h), int(w), generator=generator) * 2 - 1


def default_batch(adapter: ScaleWiseAdapter, batch_size: int, generator: torch.Generator) -> Batch:
    """Random images and, for class-conditional families, random class labels."""
    images = random_images(adapter, batch_size, generator)
    labels = None
    if adapter.num_classes is not None:
        labels = torch.randint(0, int(adapter.num_classes), (batch_size,), generator=generator)
    return Batch(labels=labels, images=images)


def text_feature_batch(adapter: ScaleWiseAdapter, batch_size: int, generator: torch.Generator,
                       name: str, dim: int, max_len: int = 4) -> Batch:
    """Random images plus one payload ``name`` of random features (n_i, dim), 1 <= n_i <= max_len:
    a ``make_batch`` for text-conditioned families."""
    lengths = torch.randint(1, max_len + 1, (batch_size,), generator=generator)
    feats = [torch.randn(int(n), dim, generator=generator) for n in lengths]
    return Batch(images=random_images(adapter, batch_size, generator), conditions={name: Padded.pad(feats)})


def same_codes(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@contextlib.contextmanager
def pinned(adapter: ScaleWiseAdapter, training: bool, dropout: float):
    """Set train mode and condition dropout for a block; restore both afterwards."""
    was, drop = adapter.backbone.training, adapter.condition_dropout
    adapter.backbone.train(training)
    adapter.condition_dropout = dropout
    try:
        yield adapter
    finally:
        adapter.condition_dropout = drop
        adapter.backbone.train(was)


def random_payload(spec, n: int, generator: torch.Generator, max_len: int = 4) -> list:
    """``n`` random (n_i, dim) features for a :class:`~sar_core.batch.PayloadSpec` (n_i its
    ``rows``, else 1..max_len; ``dim`` 8 when the spec says any)."""
    dim = int(spec.dim) if spec.dim is not None else 8
    if spec.rows is not None:
        lengths = [spec.rows] * n
    else:
        lengths = torch.randint(1, max_len + 1, (n,), generator=generator).tolist()
    return [torch.randn(int(m), dim, generator=generator) for m in lengths]


def payload_batch(adapter: ScaleWiseAdapter, batch_size: int, generator: torch.Generator) -> Batch:
    """Random images plus a random payload for every payload the adapter declares
    (``condition_payloads``): a ``make_batch`` for families conditioned on several payloads."""
    conditions = {name: Padded.pad(random_payload(spec, batch_size, generator))
                  for name, spec in sorted(adapter.condition_payloads.items())}
    return Batch(images=random_images(adapter, batch_size, generator), conditions=conditions)


def random_null_payloads(adapter: ScaleWiseAdapter, generator: torch.Generator) -> dict:
    """Random encoder-derived null payloads, (rows or 3, dim) each, for the payloads whose spec
    has ``encoded_null`` ({} for families that build their own null condition)."""
    out = {}
    for name, spec in sorted(adapter.condition_payloads.items()):
        if spec.encoded_null:
            out[name] = torch.randn(spec.rows or 3, int(spec.dim) if spec.dim is not None else 8, generator=generator)
    return out
