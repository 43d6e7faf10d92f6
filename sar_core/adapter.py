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
  wraps it in DDP / FSDP and calls it directly. Its condition dropout (class / text
  dropout probability) is read and set through :attr:`ScaleWiseAdapter.condition_dropout`.
* A condition is whatever the family needs (class ids (B,) int64, or a dict of text
  features). The core builds it only through :meth:`ScaleWiseAdapter.condition` (from a
  :class:`~sar_core.batch.Batch`), :meth:`null_condition` / :meth:`cfg_condition` and
  :meth:`condition_to`; it never looks inside. ``condition_payloads`` declares what it reads.
* Every fact the core needs is a member below (``num_classes``, ``code_space``,
  ``image_size``, ``training_image_size``, ``guidance_scale``, ...): the core never probes
  config field names or attributes.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional, Sequence

import torch
from pydantic import BaseModel
from torch import nn

from sar_core import CheckpointError  # noqa: F401  (defined torch-free in the package)
from sar_core.batch import PayloadSpec, cat_conditions, check_null_payloads, check_payloads  # noqa: F401
from sar_core.schedule import ATTENTION_PATTERNS, Schedule, ScheduleSampler  # noqa: F401
from sar_core.tokens import CodeSpace  # noqa: F401  (a contract name: what a token is)

if TYPE_CHECKING:  # pragma: no cover
    from sar_core.batch import Batch

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


def official_guidance_ramp(step: int, num_steps: int, cfg: float) -> float:
    """The official SAR trainer's ramp: t_i = cfg * 0.5 * (1 + i / (n - 1)) (cfg at n = 1)."""
    return cfg * 0.5 * (1 + step / (num_steps - 1)) if num_steps > 1 else cfg


@torch.no_grad()
def liven_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Seeded re-draw (on the CPU) of every float parameter of ``module``: N(0, 1/n) for a
    tensor of >= 2 dims whose last dim is n (a linear layer's fan-in, an embedding's width),
    N(0, 1/4) for vectors and scalars. Every block's update is of the order of its input."""
    for p in module.parameters():
        if p.is_floating_point():
            std = p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=generator).mul_(std))


class ScaleWiseAdapter(ABC):
    """A scale-wise AR model family: frozen tokenizer + trainable backbone.

    Subclasses set ``name`` and ``config_cls`` and implement the abstract methods. An
    instance owns two ``nn.Module`` attributes, ``tokenizer`` and ``backbone``.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: parameter-name fragments excluded from weight decay (besides 1-D params / biases).
    no_decay_keywords: ClassVar[tuple[str, ...]] = ()
    #: golden-case support (``sar conformance``): a :class:`sar_core.conformance.CaseRunner`
    #: subclass, or None for a family without golden cases. Not part of training.
    case_runner: ClassVar[Optional[type]] = None
    #: which scales a token attends to (``ATTENTION_PATTERNS``, masks from
    #: ``Schedule.attention_mask(pattern=...)``): ``"block-causal"``, its own and every
    #: coarser scale; ``"within-scale"``, its own only (Switti): scale k's logits are those of
    #: ``forward`` over [scale 0, scale k] on scale k's inputs, so a one-scale student pass
    #: runs that scale alone, reads no prefix, and the family counts as ``prefix_stable``.
    attention: ClassVar[str] = "block-causal"
    #: block-causal only: True when the backbone's ``forward`` accepts ``prefix=`` (a
    #: :mod:`sar_core.sar.prefix_cache` handle), so a student pass that only changes the last
    #: scale runs over its tokens on pass 1's keys / values. Default: a full pass.
    reuses_prefix: ClassVar[bool] = False
    #: True when the logits of a schedule's first j scales do not depend on its later
    #: scales: ``forward(cond, inputs[:, :offsets[j] - first_len], schedule.first(j))``
    #: equals the first ``offsets[j]`` rows of the full pass (positions do not depend on the
    #: last scale); the exposure gap then runs each per-scale pass only up to the scale it
    #: measures. Default: full passes. The contract suite checks these three members.
    prefix_stable: ClassVar[bool] = False

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

    @classmethod
    def load_tokenizer(cls, tokenizer_path: str | Path, overrides: dict | None = None) -> "ScaleWiseAdapter":
        """The tokenizer alone (``sar tokenize``), backbone a ``checkpoint_io.NoBackbone``.
        Default: :meth:`load` without a backbone file (builds a fresh one); override it."""
        return cls.load(tokenizer_path, None, overrides)

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

    def check_schedule_sampler(self, sampler: ScheduleSampler) -> None:
        """Refuse (ValueError naming the fix) a schedule sampler chosen by the user
        (``--schedule``) that this model cannot train with, e.g. schedules larger than its
        latent or position grid. Default: accept."""

    @abstractmethod
    def image_size(self, schedule: Schedule) -> tuple[int, int]:
        """Pixel (H, W) of images encoded with / decoded from ``schedule``."""

    def training_image_size(self, sampler: ScheduleSampler) -> tuple[int, int]:
        """Pixel (H, W) training images are resized to for ``sampler``'s schedules.

        Default: the size of the sampler's default schedule. Families that train one image
        size under many schedules (FlexVAR) return their configured size."""
        return tuple(self.image_size(sampler.default))

    def training_image_sizes(self, sampler: ScheduleSampler) -> list[tuple[int, int]]:
        """Every pixel (H, W) this model can train images at for ``sampler`` (e.g. one per
        aspect-ratio template). With more than one, the trainer passes them to the dataset
        as the ``image_sizes`` option, so a dataset of mixed aspect ratios can bucket its
        items (:class:`sar_core.data.datasets.AspectGrouped`, one bucket per batch). Default: the
        one training size."""
        return [tuple(self.training_image_size(sampler))]

    def schedule_for_image_size(self, size: tuple[int, int], schedule: Schedule) -> Schedule:
        """The schedule to train a batch of pixel ``size`` (one of ``training_image_sizes``
        other than the default) with, given the step's drawn ``schedule``. Default: refuse,
        the model trains one image size."""
        raise ValueError(f"this model trains {'x'.join(map(str, self.image_size(schedule)))} images only, "
                         f"not {size[0]}x{size[1]}; resize the data to one size")

    @classmethod
    def image_size_overrides(cls, size: tuple[int, int]) -> dict:
        """Config overrides that make a fresh / loaded model train at pixel ``size``
        (``--image-size``). Default: none (the size follows from the schedule)."""
        return {}

    # ---------------------------------------------------------------- model facts
    @property
    @abstractmethod
    def num_classes(self) -> Optional[int]:
        """Number of classes of a class-conditional family; None for text conditions."""

    def resize_classes(self, num_classes: int) -> None:
        """Grow (or shrink) the class embedding to ``num_classes`` classes in place, for
        fine-tuning on another class set (``model.resize_classes``): kept rows unchanged,
        new rows initialised as the family's upstream code initialises them, the null class
        still last. Families that cannot resize keep this default, which refuses."""
        raise ValueError(f"family '{self.name}' cannot resize its class embedding; use a class map "
                         "(--class-map) that fits its classes")

    @property
    @abstractmethod
    def code_space(self) -> CodeSpace:
        """What a token is (index codes of a vocabulary, or d bits)."""

    @property
    def bits_per_token(self) -> Optional[int]:
        """None for index codes; d for bitwise codes (``code_space.bits``)."""
        return self.code_space.bits

    # ---------------------------------------------------------------- conditions
    def condition(self, batch: "Batch") -> Any:
        """The backbone's condition for a batch (on the batch's device).

        Default (class-conditional families): the batch's class ids. Text-conditioned
        families read ``batch.conditions[name]`` (padded payloads with lengths)."""
        if batch.labels is None:
            names = ", ".join(sorted(batch.conditions)) or "none"
            raise ValueError(f"family '{self.name}' is class-conditional, not text-conditioned: it needs "
                             f"class labels (e.g. --labels), the batch has only condition payloads: {names}")
        return batch.labels

    def example_batch(self, batch_size: int, image_size: Optional[tuple[int, int]] = None,
                      condition_tokens: Optional[int] = None, generator: Optional[torch.Generator] = None) -> "Batch":
        """Random training data of the shapes this model trains on (``sar plan`` traces it on fake
        tensors): images at ``image_size`` (default: the training size), class ids and the
        :attr:`condition_payloads` :meth:`condition` reads, variable-length ones ``condition_tokens``
        rows long (:func:`sar_core.batch.random_batch`). Families knowing their longest override."""
        from sar_core.batch import random_batch

        size = image_size or self.training_image_size(self.schedule_sampler())
        return random_batch(batch_size, size, self.num_classes, self.condition_payloads, condition_tokens, generator)

    def condition_from_labels(self, labels: torch.Tensor) -> Any:
        """Class ids -> condition; for class-conditional sampling (``sar sample --labels``)."""
        if self.num_classes is None:
            raise ValueError(f"family '{self.name}' is not class-conditional; give condition payloads "
                             "(e.g. --text-features) instead of class labels")
        return labels

    @property
    def condition_payloads(self) -> dict[str, PayloadSpec]:
        """The named payloads :meth:`condition` reads (name -> :class:`~sar_core.batch.PayloadSpec`),
        checked against ``--payload`` / the data before any work. Default: none for
        class-conditional families, else one ``text_features`` sequence."""
        return {} if self.num_classes is not None else {"text_features": PayloadSpec()}

    def check_payloads(self, payloads: dict, where: str, hint: str = "") -> None:
        """One-line ValueError naming a missing / unexpected / misshapen payload from ``where``."""
        check_payloads(self.condition_payloads, payloads, self.name, where, hint)

    def set_null_payloads(self, payloads: dict) -> None:
        """Receive the encoder-derived null payloads ({name: (n, dim)}, the encoder's empty prompt,
        in no checkpoint) of the ``encoded_null`` specs, checked; ``null_condition`` and dropout
        read them via :meth:`null_payload`. Families keeping them elsewhere too extend this."""
        self._null_payloads = {k: v.to(self.device) for k, v in
                               check_null_payloads(self.condition_payloads, payloads, self.name).items()}

    def null_payload(self, name: str) -> torch.Tensor:
        """Null payload ``name`` on the model's device; a ValueError naming ``--null-payload`` if not given."""
        if name not in getattr(self, "_null_payloads", {}):
            raise ValueError(f"family '{self.name}' needs the null payload '{name}' (the text encoder's features "
                             f"of the empty prompt, in no checkpoint): give --null-payload {name}=FILE "
                             "(sar encode-text writes null_payloads.pt)")
        return self._null_payloads[name].to(self.device)

    def null_condition(self, cond: Any) -> Any:
        """The null (unconditional) condition, one row per row of ``cond``.

        Default for class-conditional families: class id ``num_classes``."""
        if self.num_classes is None or not isinstance(cond, torch.Tensor):
            raise NotImplementedError(f"family '{self.name}' must implement null_condition()")
        return torch.full_like(cond, int(self.num_classes))

    def cfg_condition(self, cond: Any) -> Any:
        """Batch of 2B rows: ``cond`` then the null (unconditional) condition."""
        return cat_conditions([cond, self.null_condition(cond)])

    @property
    def condition_dropout(self) -> float:
        """Probability that the backbone replaces a row's condition by the null condition.
        Whether it also drops in eval mode is the family's (upstream VAR and FlexVAR do), so
        the core runs every evaluation, sampling and golden case inside :meth:`inference`,
        which sets it to 0. Default: the backbone's ``cond_drop_rate`` attribute."""
        return float(self.backbone.cond_drop_rate)

    @condition_dropout.setter
    def condition_dropout(self, p: float) -> None:
        self.backbone.cond_drop_rate = float(p)

    @contextlib.contextmanager
    def inference(self) -> Iterator["ScaleWiseAdapter"]:
        """Eval mode with condition dropout 0; both restored on exit, even on error."""
        was_training, drop = self.backbone.training, self.condition_dropout
        self.backbone.eval()
        self.condition_dropout = 0.0
        try:
            yield self
        finally:
            self.condition_dropout = drop
            self.backbone.train(was_training)

    # ---------------------------------------------------------------- guidance
    def guidance_scale(self, step: int, num_steps: int, cfg: float) -> float:
        """Guidance strength t at scale ``step`` of ``num_steps`` for a *rollout* guided with
        ``cfg`` (a SAR step's sampled predictions); logits = (1 + t) * cond - t * uncond.
        Default: the official SAR trainer's ramp. :meth:`generate` keeps the upstream
        sampler's own ramp (VAR's cfg * i / (n - 1), ...; the suite's ``sampler_guided_logits``)."""
        return official_guidance_ramp(step, num_steps, cfg)

    def guide_logits(self, cond_logits: torch.Tensor, uncond_logits: torch.Tensor, step: int,
                     num_steps: int, cfg: float) -> torch.Tensor:
        """Guided logits a rollout samples from at scale ``step`` (float32)."""
        t = self.guidance_scale(step, num_steps, cfg)
        return (1 + t) * cond_logits - t * uncond_logits

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

    def mix_codes(self, codes: Codes, replace: dict) -> Codes:
        """Codes whose :meth:`teacher_inputs` read ``replace[k]`` at the scales k in ``replace``
        and ``codes`` (its input history) elsewhere, for the deeper ``ssr`` passes. Default: a
        plain list; override when codes carry more (e.g. a self-correction's flipped history)."""
        return [replace.get(k, c) for k, c in enumerate(codes)]

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
        """Teacher-forcing logits; see the module docstring for the layout.

        ``student_forcing=True`` marks the official short student pass (the ``official``
        rollout): ``schedule`` is a two-scale sub-schedule [scale 0, scale k] of the
        training schedule and ``inputs`` are scale k's inputs; the start token(s) are then
        built without their start position, everything else exactly as with the flag off
        (whose short-pass start logits equal the full pass's: no scale reads a later one).
        Checked by :class:`sar_core.testing.AdapterContractTests`."""
        return self.backbone(cond, inputs, schedule, student_forcing=student_forcing)

    def transformer_blocks(self) -> Sequence[nn.Module]:
        """The backbone's repeated transformer blocks, in order: the units that
        activation checkpointing (``train.activation_checkpointing``) recomputes. Each is
        called as a module (``block(*args)``); its inputs and outputs are tensors or
        objects the block only reads. Default: none (checkpointing is refused)."""
        return ()

    def liven(self, generator: torch.Generator) -> None:
        """Seeded re-draw of the backbone's weights so that each transformer block changes
        its output far more than any tolerance (the contract suite's first step: upstream
        inits make blocks near-identity and hide bugs inside them; golden cases: see
        docs/conformance.md). Default: :func:`liven_parameters`. Override when a parameter
        must keep a structure (a positive scale): call the default, then fix it."""
        liven_parameters(self.backbone, generator)

    @abstractmethod
    def generate(self, cond: Any, schedule: Schedule, *, cfg: float, top_k: int = 0,
                 top_p: float = 0.0, generator: torch.Generator | None = None,
                 **options: Any) -> Generation:
        """KV-cached autoregressive sampling with classifier-free guidance, exactly as the
        upstream sampler (its guidance ramp and top-k / top-p rules)."""

    # ---------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return next(iter([*self.backbone.parameters(), *self.tokenizer.parameters()])).device

    def to(self, device: torch.device | str) -> "ScaleWiseAdapter":
        self.tokenizer.to(device)
        self.backbone.to(device)
        return self

    def describe(self) -> dict:
        """A short JSON-friendly summary (printed by the CLI)."""
        n = sum(p.numel() for p in self.backbone.parameters())
        return {"family": self.name, "backbone_params": n,
                "schedule": str(self.default_schedule), **self.config.model_dump()}
