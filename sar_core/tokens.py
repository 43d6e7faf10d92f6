"""Family-agnostic views of logits and codes, and the per-token losses built on them.

Index codes: logits (B, L, V), codes (B, L). Bitwise codes: logits (B, L, 2d), codes
(B, L, d). Both are viewed as groups: logits (B, L, G, C), codes (B, L, G) with G = 1,
C = V for index codes and G = d, C = 2 for bitwise codes. The token loss is the mean over
groups of the cross-entropy over classes (index CE, or upstream's per-bit CE).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange


def group_logits(logits: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """(B, L, V) or (B, L, 2d) -> (B, L, G, C)."""
    if bits is None:
        return logits.unsqueeze(-2)
    return rearrange(logits, "b l (g c) -> b l g c", g=bits, c=2)


def group_codes(codes: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """(B, L) or (B, L, d) -> (B, L, G)."""
    return codes.unsqueeze(-1) if bits is None else codes


def ungroup_codes(codes_BLG: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    return codes_BLG.squeeze(-1) if bits is None else codes_BLG


def cat_codes(codes: list) -> torch.Tensor:
    """Per-scale codes -> one (B, L[, d]) tensor."""
    return torch.cat(list(codes), dim=1)


def split_codes(codes: torch.Tensor, counts: tuple[int, ...]) -> list:
    return list(torch.split(codes, list(counts), dim=1))


def token_ce(logits: torch.Tensor, target: torch.Tensor, bits: Optional[int],
             label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy (B, L): mean over groups of CE over classes."""
    lg = group_logits(logits, bits).float()
    tg = group_codes(target, bits).long()
    ce = F.cross_entropy(rearrange(lg, "b l g c -> (b l g) c"), tg.reshape(-1),
                         reduction="none", label_smoothing=label_smoothing)
    return ce.view(tg.shape).mean(-1)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, bits: Optional[int],
             temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL(teacher || student) at a temperature, (B, L); teacher is detached."""
    s = group_logits(student_logits, bits).float() / temperature
    t = group_logits(teacher_logits.detach(), bits).float() / temperature
    t_logp = t.log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s.log_softmax(-1))).sum(-1)
    return kl.mean(-1) * temperature ** 2


def token_argmax(logits: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    return ungroup_codes(group_logits(logits, bits).argmax(-1), bits)


def mean_token_loss(loss_BL: torch.Tensor, mask_BL: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream reduction: weights 1/L per token, summed over tokens, mean over batch.

    With a mask only the selected tokens count, each weighted 1/(number selected)."""
    if mask_BL is None:
        return loss_BL.mean()
    m = mask_BL.to(loss_BL.dtype)
    return (loss_BL * m).sum() / m.sum().clamp_min(1)
