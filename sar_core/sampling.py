"""Token sampling shared by samplers and rollouts (top-k, top-p, guidance).

The rules follow the upstream VAR family sampler so that seeded draws reproduce it:
top-k drops every logit strictly below the k-th largest; top-p sorts ascending and drops
entries whose cumulative probability is <= 1 - top_p (never the largest); one
``torch.multinomial`` draw per row, rows ordered (batch, token).
"""

from __future__ import annotations

import torch


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Return a copy of ``logits`` (..., V) with filtered entries set to -inf."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits.masked_fill_(drop, float("-inf"))
    return logits


def sample_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one index per row of ``logits`` (..., V) -> int64 (...)."""
    # top_k == 1 still draws (a one-hot distribution) so the RNG stream matches upstream
    filtered = filter_top_k_top_p(logits, top_k, top_p)
    probs = filtered.float().softmax(dim=-1).reshape(-1, logits.shape[-1])
    idx = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
    return idx.reshape(logits.shape[:-1])


def guide(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance in VAR's form: (1 + t) * cond - t * uncond."""
    return (1 + t) * cond_logits - t * uncond_logits
