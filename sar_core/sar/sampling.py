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


def candidate_probs(logits: torch.Tensor, top_k: int, top_p: float = 0.0):
    """(probs (..., k) float32, indices (..., k)) of the top-k / top-p filtered
    distribution over the k largest logits (descending); None when a row has ties with
    its k-th value (the full filter keeps all of them)."""
    vals, idx = logits.topk(top_k, dim=-1, largest=True, sorted=True)
    if bool((logits == vals[..., -1:]).sum(-1).gt(1).any()):
        return None
    if top_p > 0:
        drop_asc = vals.flip(-1).softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        drop_asc[..., -1:] = False
        vals = vals.masked_fill(drop_asc.flip(-1), float("-inf"))
    return vals.float().softmax(dim=-1), idx


def sample_candidates(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Same filtered distribution as :func:`sample_logits`, drawn among the top-k
    candidates only: one ``topk`` instead of a sort and a multinomial over the whole
    vocabulary, and an inverse-CDF draw (:func:`inverse_cdf_draw`) instead of a multinomial. The draws differ from upstream's stream (rollouts use it unless they are
    ``upstream_exact``); without a top-k, or with ties at the k-th value, it is
    :func:`sample_logits`."""
    vocab = logits.shape[-1]
    cand = candidate_probs(logits, top_k, top_p) if 0 < top_k < vocab else None
    if cand is None:
        return sample_logits(logits, top_k, top_p, generator)
    probs, idx = cand
    pick = inverse_cdf_draw(probs.reshape(-1, top_k), generator)
    return idx.reshape(-1, top_k).gather(1, pick).reshape(logits.shape[:-1])


def inverse_cdf_draw(probs_NK: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs_NK`` drawn with probability proportional to it: one
    uniform per row against the row's cumulative sum (a ``searchsorted``; on CPU several
    times cheaper than ``torch.multinomial``, whose draws it does not reproduce).
    Zero-probability entries are never drawn: (N, 1) int64."""
    cdf = probs_NK.cumsum(-1)
    u = torch.rand(probs_NK.shape[0], 1, generator=generator, device=probs_NK.device, dtype=cdf.dtype)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # rounding can put u * total on the total itself: fall back to the last entry with mass
    last = probs_NK.shape[-1] - 1 - (probs_NK.flip(-1) > 0).int().argmax(-1, keepdim=True)
    return torch.minimum(pick, last)
