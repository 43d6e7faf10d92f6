"""Family-agnostic views of logits and codes, and the per-token losses built on them.

Index codes: logits (B, L, V), codes (B, L). Bitwise codes: logits (B, L, 2d), codes
(B, L, d). Both are viewed as groups: logits (B, L, G, C), codes (B, L, G) with G = 1,
C = V for index codes and G = d, C = 2 for bitwise codes. The token loss is the mean over
groups of the cross-entropy over classes (index CE, or upstream's per-bit CE).
:class:`CodeSpace` says which of the two a family's tokens are (``adapter.code_space``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class CodeSpace:
    """What one token is: an index into ``vocab_size`` codes, or ``bits`` independent bits.

    Exactly one of the two is set. ``logits_width`` is the last dimension of the
    backbone's logits (V, or 2 * bits laid out as in the module docstring).
    """

    vocab_size: Optional[int] = None
    bits: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.vocab_size is None) == (self.bits is None):
            raise ValueError("a CodeSpace has exactly one of vocab_size (index codes) or bits (bitwise codes)")
        n = self.vocab_size if self.bits is None else self.bits
        if int(n) < 1:
            raise ValueError(f"a CodeSpace needs a positive size, got {n}")

    @property
    def bitwise(self) -> bool:
        return self.bits is not None

    @property
    def logits_width(self) -> int:
        return 2 * int(self.bits) if self.bits is not None else int(self.vocab_size)

    def __str__(self) -> str:
        return f"{self.bits} bits" if self.bitwise else f"{self.vocab_size} codes"


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
