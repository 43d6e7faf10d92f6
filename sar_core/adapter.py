"""The adapter contract: what a model family provides so that sar can post-train it.

An adapter bundles a frozen *tokenizer* (images <-> per-scale codes) and a trainable
*backbone* (condition + per-scale inputs -> per-scale logits) of one family. The SAR core
(rollouts, losses, trainer, conformance kit) talks to a model only through this class, so
a third-party family becomes trainable by subclassing :class:`ScaleWiseAdapter` and
registering it (see :mod:`sar_core.hookspecs`).

Conventions every adapter follows
---------------------------------
* Images entering the tokenizer are float (B, 3, H, W) in [-1, 1]; ``decode`` returns
  [-1, 1]; ``generate`` returns images in [0, 1].
* Codes are a list with one tensor per scale of the schedule. Index codes (VQ) are int64
  (B, h*w); bitwise codes (BSQ, ``bits_per_token = d``) are int64 (B, h*w, d) in {0, 1}.
  Tokens are row-major inside a scale.
* Backbone inputs for scales 1..K-1 are one tensor (B, L - first_len, C_in): position j is
  the input of token ``first_len + j``. Scale 0 is the start token(s) built from the
  condition inside the backbone.
* Logits are (B, L, V) for index codes and (B, L, 2*d) for bitwise codes, laid out as
  ``[bit0_logit0, bit0_logit1, bit1_logit0, ...]``; :mod:`sar_core.tokens` views them as
  (B, L, G, C) groups so losses and rollouts stay family-agnostic.
* The backbone is an ``nn.Module`` whose ``forward(cond, inputs, schedule,
  student_forcing=False)`` returns logits. It is the only module that trains; the trainer
  wraps it in DDP / FSDP and calls it directly. It has a float attribute
  ``cond_drop_rate`` (class / text dropout probability; the trainer sets it, conformance
  sets it to 0).
* A condition is whatever the family needs (class ids (B,) int64, or a dict of text
  features). ``cfg_condition`` and ``condition_from_labels`` are the only places the core
  touches it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from sar_core.schedule import Schedule, ScheduleSampler

Codes = list  # list[torch.Tensor], one entry per scale


class AdapterConfig(BaseModel):
    """Base of every family's config. Subclasses add their hyper-parameters."""

    model_config = {"extra": "forbid"}


@dataclass
class Generation:
    """Result of :meth:`ScaleWiseAdapter.generate`."""

    codes: Codes
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    guided_logits: list = field(default_factory=list)  # per scale, what the sampler saw


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or belongs to another family / size."""


class ScaleWiseAdapter(ABC):
    """A scale-wise AR model family: frozen tokenizer + trainable backbone.

    Subclasses set ``name`` and ``config_cls`` and implement the abstract methods. An
    instance owns two ``nn.Module`` attributes, ``tokenizer`` and ``backbone``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: None for index codes; d for bitwise codes of d bits per token.
    bits_per_token: ClassVar[Optional[int]] = None
    #: parameter-name fragments excluded from weight decay (besides 1-D params / biases).
    no_decay_keywords: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: AdapterConfig, tokenizer: nn.Module, backbone: nn.Module):
        self.config = config
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.tokenizer.eval().requires_grad_(False)

    # ---------------------------------------------------------------- construction
    @classmethod
    @abstractmethod
    def from_config(cls, config: AdapterConfig) -> "ScaleWiseAdapter":
        """Build a randomly initialised model (used by pretraining and tests)."""

    @classmethod
    @abstractmethod
    def load(cls, tokenizer_path: str | Path, backbone_path: str | Path | None,
             overrides: dict | None = None) -> "ScaleWiseAdapter":
        """Load upstream files in their native layouts (``weights_only=True``).

        The config is inferred from the state dicts; ``overrides`` (field -> value) wins
        over inference. ``backbone_path=None`` builds a fresh backbone for the tokenizer.
        Raise :class:`CheckpointError` naming missing / unexpected keys on mismatch.
        """

    @abstractmethod
    def save(self, tokenizer_path: str | Path | None, backbone_path: str | Path | None,
             layout: str = "plain") -> None:
        """Write the model back in the upstream layout (atomically), loadable strictly
        by upstream code. ``layout`` names one of the family's upstream layouts."""

    # ---------------------------------------------------------------- schedules
    @property
    @abstractmethod
    def default_schedule(self) -> Schedule:
        """The schedule the checkpoint was trained / is sampled with."""

    def schedule_sampler(self, seed: int = 0) -> ScheduleSampler:
        """Per-step training schedules; the default always returns ``default_schedule``."""
        return ScheduleSampler(self.default_schedule, seed)

    @abstractmethod
    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        """Pixel (H, W) of images encoded with / decoded from ``schedule``."""

    # ---------------------------------------------------------------- conditions
    def condition_from_labels(self, labels: torch.Tensor) -> Any:
        """Turn a dataset's labels into the backbone's condition (identity for classes)."""
        return labels

    @abstractmethod
    def cfg_condition(self, cond: Any) -> Any:
        """Batch of 2B rows: ``cond`` then the null (unconditional) condition."""

    def condition_to(self, cond: Any, device: torch.device) -> Any:
        if isinstance(cond, torch.Tensor):
            return cond.to(device)
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cond.items()}

    # ---------------------------------------------------------------- tokenizer side
    @abstractmethod
    def encode(self, images: torch.Tensor, schedule: Schedule) -> Codes:
        """Images in [-1, 1] -> ground-truth codes per scale."""

    @abstractmethod
    def teacher_inputs(self, codes: Codes, schedule: Schedule) -> torch.Tensor:
        """Codes -> teacher-forcing inputs (B, L - first_len, C_in)."""

    @abstractmethod
    def stagger_inputs(self, gt_codes: Codes, pred_codes: Codes, schedule: Schedule,
                       scales: Sequence[int]) -> torch.Tensor:
        """Stagger-scale inputs for SAR, (B, L - first_len, C_in).

        For every k in ``scales`` (0 <= k <= K-2) the input of scale k+1 is built exactly
        as the model's own sampler would build it from ground truth below k and the
        prediction ``pred_codes[k]`` at k. Inputs of the other scales are the
        teacher-forcing inputs. ``pred_codes`` may hold ``None`` at unused scales.
        """

    @abstractmethod
    def decode(self, codes: Codes, schedule: Schedule) -> torch.Tensor:
        """Codes -> images in [-1, 1]."""

    def tokenizer_training_loss(self, images: torch.Tensor, schedule: Schedule) -> tuple[torch.Tensor, dict]:
        """Loss for fitting the tokenizer from scratch (``sar pretrain``): reconstruction
        plus quantisation terms, differentiable w.r.t. ``self.tokenizer``. Returns
        (loss, {name: float} stats). Optional: families that only load released
        tokenizers may leave it unimplemented."""
        raise NotImplementedError(f"family '{self.name}' cannot fit its tokenizer from scratch")

    # ---------------------------------------------------------------- backbone side
    def forward(self, cond: Any, inputs: torch.Tensor, schedule: Schedule,
                student_forcing: bool = False) -> torch.Tensor:
        """Teacher-forcing logits; see the module docstring for the layout."""
        return self.backbone(cond, inputs, schedule, student_forcing=student_forcing)

    @abstractmethod
    def generate(self, cond: Any, schedule: Schedule, *, cfg: float, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None,
                 **options: Any) -> Generation:
        """KV-cached autoregressive sampling with classifier-free guidance, exactly as the
        upstream sampler (its guidance ramp and top-k / top-p rules)."""

    # ---------------------------------------------------------------- conformance
    #: per-key (atol, rtol) overrides used by the conformance kit
    case_tolerances: ClassVar[dict] = {}

    @classmethod
    def case_overrides(cls, config: dict) -> dict:
        """Config overrides a golden case's config.json implies (default: none; sizes are
        inferred from the checkpoints)."""
        return {}

    @abstractmethod
    def run_case(self, case: dict, config: dict) -> dict:
        """Compute every output a golden case of this family records.

        ``case`` is the loaded case.pt (it may hold inputs only), ``config`` the parsed
        config.json. Return a dict keyed like case.pt; the conformance kit compares and
        dumps it.
        """

    # ---------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def to(self, device: torch.device | str) -> "ScaleWiseAdapter":
        self.tokenizer.to(device)
        self.backbone.to(device)
        return self

    def describe(self) -> dict:
        """A short JSON-friendly summary (printed by the CLI)."""
        n = sum(p.numel() for p in self.backbone.parameters())
        return {"family": self.name, "backbone_params": n,
                "schedule": str(self.default_schedule), **self.config.model_dump()}
