"""The suite's base: the author hooks, tolerances and fixtures every check reads."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import pytest
import torch

from sar_core.adapter import ScaleWiseAdapter
from sar_core.batch import Batch
from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule
from sar_core.testing.helpers import default_batch, random_null_payloads


class ContractBase:
    """Author hooks and fixtures of :class:`~sar_core.testing.AdapterContractTests`."""

    batch_size: int = 2
    #: KV-cached sampler vs teacher-forced pass over its own inputs (atol, rtol)
    sampler_tol: tuple[float, float] = (1e-5, 1e-4)
    #: a short pass vs the same tokens of the full pass (atol, rtol)
    forward_tol: tuple[float, float] = (1e-5, 1e-5)
    #: guidance scale and options the sampler checks use
    sample_cfg: float = 1.5
    sample_options: dict = {}
    #: False for a family whose start token has no start position (then the
    #: student-forcing flag changes nothing and that is checked instead)
    student_forcing_drops_start_position: bool = True
    #: seed of ``adapter.liven``, the re-draw of the backbone's weights before every check,
    #: so that each transformer block changes its output far more than the tolerances
    #: (upstream inits make blocks near-identity: bugs inside them would hide); None keeps
    #: the weights ``make_adapter`` built
    liven_seed: Optional[int] = 0
    #: the least change of some teacher-forced logit that must follow from skipping one
    #: transformer block or changing an input the logit reads (1000x the default atol)
    block_effect: float = 1e-2

    # ---------------------------------------------------------------- author hooks
    def make_adapter(self) -> ScaleWiseAdapter:
        raise NotImplementedError("subclass AdapterContractTests and implement make_adapter()")

    def make_batch(self, adapter: ScaleWiseAdapter, batch_size: int, generator: torch.Generator) -> Batch:
        return default_batch(adapter, batch_size, generator)

    def schedule(self, adapter: ScaleWiseAdapter) -> Schedule:
        """The schedule the tokenizer / backbone checks run with."""
        return adapter.schedule_sampler().default

    def generate_schedule(self, adapter: ScaleWiseAdapter) -> Schedule:
        return self.schedule(adapter)

    def save_load_paths(self, tmp_path: Path) -> tuple[Path, Path]:
        return tmp_path / "tokenizer.pth", tmp_path / "backbone.pth"

    def load_overrides(self, adapter: ScaleWiseAdapter) -> Optional[dict]:
        """Overrides ``load`` needs to rebuild the same model (facts a file does not hold)."""
        return None

    def foreign_checkpoints(self, tmp_path: Path) -> list[Path]:
        """Files of another family (or none) that ``load`` must refuse with CheckpointError."""
        path = tmp_path / "foreign.pth"
        torch.save({"state_dict": {"other.weight": torch.zeros(3, 3)}, "family": "other"}, path)
        return [path]

    def make_null_payloads(self, adapter: ScaleWiseAdapter, generator: torch.Generator) -> dict:
        """The encoder-derived null payloads the suite gives a family whose payload specs have
        ``encoded_null`` (``set_null_payloads``). Default: random features of the declared
        widths; an author may return a real encoder's features of the empty prompt."""
        return random_null_payloads(adapter, generator)

    def sampler_guided_logits(self, adapter: ScaleWiseAdapter, cond_logits: torch.Tensor,
                              uncond_logits: torch.Tensor, step: int, num_steps: int, cfg: float) -> torch.Tensor:
        """How the family's sampler guides scale ``step`` (default: ``adapter.guide_logits``)."""
        return adapter.guide_logits(cond_logits, uncond_logits, step, num_steps, cfg)

    # ---------------------------------------------------------------- fixtures
    def prepared_adapter(self) -> ScaleWiseAdapter:
        """What every check runs on: ``make_adapter()`` (torch seeded 0), livened with
        ``liven_seed``, in eval mode with condition dropout 0 (the ``adapter`` fixture)."""
        torch.manual_seed(0)
        ad = self.make_adapter()
        if self.liven_seed is not None:
            ad.liven(torch.Generator().manual_seed(int(self.liven_seed)))
        ad.backbone.eval()
        ad.condition_dropout = 0.0
        nulls = self.make_null_payloads(ad, torch.Generator().manual_seed(11))
        if nulls:
            ad.set_null_payloads(nulls)
        return ad

    @pytest.fixture
    def adapter(self) -> ScaleWiseAdapter:
        return self.prepared_adapter()

    @pytest.fixture
    def batch(self, adapter) -> Batch:
        return self.make_batch(adapter, self.batch_size, torch.Generator().manual_seed(0))

    @pytest.fixture
    def gt(self, adapter, batch) -> list:
        return adapter.encode(batch.images, self.schedule(adapter))

    def _cond(self, adapter, batch):
        return adapter.condition_to(adapter.condition(batch), adapter.device)

    def _generate(self, adapter, cond, seed: int, **kw):
        return adapter.generate(cond, self.generate_schedule(adapter), generator=torch.Generator().manual_seed(seed),
                                **{"cfg": self.sample_cfg, "top_k": 0, "top_p": 0.0, **self.sample_options, **kw})

    def _step_grads(self, adapter, cond, gt, sched, rollout, loss_name="hard") -> tuple:
        adapter.backbone.train()
        adapter.backbone.zero_grad(set_to_none=True)
        res = sar_step(adapter, adapter.backbone, cond, gt, sched, rollout, BUILTIN_LOSSES[loss_name](), 0.5,
                       generator=torch.Generator().manual_seed(0), rng=random.Random(0),
                       backward=lambda l: l.backward())
        grads = {n: p.grad.clone() for n, p in adapter.backbone.named_parameters() if p.grad is not None}
        adapter.backbone.zero_grad(set_to_none=True)
        adapter.backbone.eval()
        return res.total.detach(), grads

    def _assert_same_grads(self, a, b) -> None:
        (t1, g1), (t2, g2) = a, b
        torch.testing.assert_close(t1, t2, atol=1e-6, rtol=1e-5)
        assert g1.keys() == g2.keys() and g1
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], atol=2e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
