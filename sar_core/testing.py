"""The public adapter contract suite: every property the SAR core relies on, as pytest tests.

An adapter author subclasses :class:`AdapterContractTests` in a ``test_*.py`` file under a
name pytest collects (``Test*``) and provides one method that builds a tiny model::

    from sar_core.testing import AdapterContractTests
    from my_family import MyAdapter, MyConfig

    class TestMyAdapter(AdapterContractTests):
        def make_adapter(self):
            return MyAdapter.from_config(MyConfig(depth=1, embed_dim=32))

Optional overrides: :meth:`make_batch` (text-conditioned families add ``conditions``),
:meth:`schedule` / :meth:`generate_schedule`, :meth:`save_load_paths`,
:meth:`load_overrides`, :meth:`foreign_checkpoints`, :meth:`sampler_guided_logits` (when
the family's sampler guides with another ramp than ``adapter.guide_logits``), and the
class attributes below (tolerances, sampling settings). The suite works for index and
bitwise codes (``adapter.code_space``) and non-square schedules. ``make_adapter`` should
build a model whose only randomness in train mode is condition dropout (dropout and drop
path 0), with ``condition_dropout`` 0.

Imports pytest: use it from tests only.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Optional

import pytest
import torch

from sar_core.adapter import CheckpointError, CodeSpace, ScaleWiseAdapter
from sar_core.batch import Batch, Padded
from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.rollouts import BUILTIN_ROLLOUTS
from sar_core.sar.step import sar_step
from sar_core.schedule import Schedule

#: (rollout, loss) pairs one ``sar_step`` runs with; ``none`` has no student pass.
ROLLOUT_LOSSES = [("none", None)] + [(r, l) for r in ("ssr", "official") for l in ("hard", "soft", "naive")]


# ------------------------------------------------------------------------- helpers
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


# ------------------------------------------------------------------------- the suite
class AdapterContractTests:
    """Subclass as ``Test<Family>`` and implement :meth:`make_adapter`. See the module docstring."""

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

    def sampler_guided_logits(self, adapter: ScaleWiseAdapter, cond_logits: torch.Tensor,
                              uncond_logits: torch.Tensor, step: int, num_steps: int, cfg: float) -> torch.Tensor:
        """How the family's sampler guides scale ``step`` (default: ``adapter.guide_logits``)."""
        return adapter.guide_logits(cond_logits, uncond_logits, step, num_steps, cfg)

    # ---------------------------------------------------------------- fixtures
    @pytest.fixture
    def adapter(self) -> ScaleWiseAdapter:
        torch.manual_seed(0)
        ad = self.make_adapter()
        ad.backbone.eval()
        ad.condition_dropout = 0.0
        return ad

    @pytest.fixture
    def batch(self, adapter) -> Batch:
        return self.make_batch(adapter, self.batch_size, torch.Generator().manual_seed(0))

    @pytest.fixture
    def gt(self, adapter, batch) -> list:
        return adapter.encode(batch.images, self.schedule(adapter))

    def _cond(self, adapter, batch):
        return adapter.condition_to(adapter.condition(batch), adapter.device)

    # ---------------------------------------------------------------- shapes and codes
    def test_codes_inputs_logits_images_shapes(self, adapter, batch, gt):
        sched, space, B = self.schedule(adapter), adapter.code_space, self.batch_size
        assert len(gt) == len(sched)
        for k, c in enumerate(gt):
            assert c.dtype == torch.int64 and tuple(c.shape) == code_shape(space, B, sched.token_counts[k]), k
            assert int(c.min()) >= 0 and int(c.max()) < (2 if space.bitwise else space.vocab_size)
        x = adapter.teacher_inputs(gt, sched)
        assert x.shape[:2] == (B, sched.total_tokens - sched.first_len) and x.is_floating_point()
        logits = adapter.forward(self._cond(adapter, batch), x, sched)
        assert tuple(logits.shape) == (B, sched.total_tokens, space.logits_width)
        assert torch.isfinite(logits).all()
        img = adapter.decode(gt, sched)
        assert tuple(img.shape) == (B, 3, *adapter.image_size(sched))
        assert float(img.min()) >= -1 and float(img.max()) <= 1

    # ---------------------------------------------------------------- stagger inputs
    def test_stagger_equals_teacher_when_predictions_are_ground_truth(self, adapter, gt):
        sched = self.schedule(adapter)
        tf = adapter.teacher_inputs(gt, sched)
        every = list(range(len(sched) - 1))
        assert torch.equal(adapter.stagger_inputs(gt, [g.clone() for g in gt], sched, every), tf)
        assert torch.equal(adapter.stagger_inputs(gt, [None] * len(gt), sched, []), tf)

    def test_wrong_prediction_changes_only_the_next_scale_input(self, adapter, gt):
        sched = self.schedule(adapter)
        tf = adapter.teacher_inputs(gt, sched)
        for k in range(len(sched) - 1):
            pred = [None] * len(gt)
            pred[k] = wrong_codes(gt[k], adapter.code_space)
            st = adapter.stagger_inputs(gt, pred, sched, [k])
            assert st.shape == tf.shape
            for s in range(1, len(sched)):
                a, b = st[:, input_slice(sched, s)], tf[:, input_slice(sched, s)]
                if s == k + 1:
                    assert not torch.equal(a, b), f"a wrong prediction at scale {k} left scale {s} unchanged"
                else:
                    assert torch.equal(a, b), f"a wrong prediction at scale {k} changed scale {s}'s input"

    def test_stagger_rejects_scales_out_of_range(self, adapter, gt):
        sched = self.schedule(adapter)
        with pytest.raises(ValueError):
            adapter.stagger_inputs(gt, gt, sched, [len(sched) - 1])

    # ---------------------------------------------------------------- student forcing
    def test_student_forcing_flag_is_the_official_short_pass(self, adapter, batch, gt):
        """``student_forcing=True``: the official short student pass, run on the two-scale
        schedule [scale 0, scale k] with scale k's real inputs; only the start token(s)
        differ: they are built without their start position. With the flag off, the start
        token(s) of a short pass equal those of the full pass (block-causal attention)."""
        sched = self.schedule(adapter)
        cond, k = self._cond(adapter, batch), len(sched) - 1
        x = adapter.teacher_inputs(gt, sched)
        short = sched.sub([0, k])
        xs = x[:, input_slice(sched, k)]
        full = adapter.forward(cond, x, sched)
        plain = adapter.forward(cond, xs, short)
        sf = adapter.forward(cond, xs, short, student_forcing=True)
        width = adapter.code_space.logits_width
        assert tuple(sf.shape) == tuple(plain.shape) == (self.batch_size, short.total_tokens, width)
        assert torch.isfinite(sf).all()
        atol, rtol = self.forward_tol
        first = sched.first_len
        torch.testing.assert_close(plain[:, :first], full[:, :first], atol=atol, rtol=rtol)
        if self.student_forcing_drops_start_position:
            assert not torch.allclose(sf, plain), "student_forcing=True changed nothing"
        else:
            torch.testing.assert_close(sf, plain, atol=atol, rtol=rtol)

    # ---------------------------------------------------------------- conditions
    def test_condition_dropout_one_gives_null_condition_zero_changes_nothing(self, adapter, batch, gt):
        sched = self.schedule(adapter)
        cond = self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        with torch.no_grad():
            ref = adapter.forward(cond, x, sched)                      # eval mode, dropout 0
            null = adapter.forward(adapter.null_condition(cond), x, sched)
            with pinned(adapter, training=True, dropout=0.0):
                torch.manual_seed(3)
                state = torch.get_rng_state()
                kept = adapter.forward(cond, x, sched)
                assert torch.equal(torch.get_rng_state(), state), "condition dropout 0 drew random numbers"
            with pinned(adapter, training=True, dropout=1.0):
                dropped = adapter.forward(cond, x, sched)
        atol, rtol = self.forward_tol   # train and eval kernels may differ by rounding
        torch.testing.assert_close(kept, ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(dropped, null, atol=atol, rtol=rtol)
        assert not torch.allclose(null, ref), "the null condition gives the same logits as the condition"

    def test_cfg_condition_is_condition_then_null(self, adapter, batch, gt):
        sched = self.schedule(adapter)
        cond = self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        B = self.batch_size
        with torch.no_grad():
            both = adapter.forward(adapter.cfg_condition(cond), torch.cat([x, x]), sched)
            one = adapter.forward(cond, x, sched)
            null = adapter.forward(adapter.null_condition(cond), x, sched)
        atol, rtol = self.forward_tol
        torch.testing.assert_close(both[:B], one, atol=atol, rtol=rtol)
        torch.testing.assert_close(both[B:], null, atol=atol, rtol=rtol)

    def test_inference_context_restores_mode_and_dropout(self, adapter):
        with pinned(adapter, training=True, dropout=0.25):
            with adapter.inference() as ad:
                assert not ad.backbone.training and ad.condition_dropout == 0.0
            assert adapter.backbone.training and adapter.condition_dropout == 0.25
            with pytest.raises(RuntimeError, match="boom"):
                with adapter.inference():
                    raise RuntimeError("boom")
            assert adapter.backbone.training and adapter.condition_dropout == 0.25

    # ---------------------------------------------------------------- sampling
    def _generate(self, adapter, cond, seed: int, **kw):
        return adapter.generate(cond, self.generate_schedule(adapter), generator=torch.Generator().manual_seed(seed),
                                **{"cfg": self.sample_cfg, "top_k": 0, "top_p": 0.0, **self.sample_options, **kw})

    def test_seeded_generate_is_reproducible_and_follows_the_schedule(self, adapter, batch):
        sched, cond = self.generate_schedule(adapter), self._cond(adapter, batch)
        a, b, c = (self._generate(adapter, cond, s) for s in (5, 5, 6))
        assert same_codes(a.codes, b.codes) and torch.equal(a.images, b.images)
        assert not same_codes(a.codes, c.codes), "another seed drew the same codes"
        for k, code in enumerate(a.codes):
            assert tuple(code.shape) == code_shape(adapter.code_space, self.batch_size, sched.token_counts[k])
        assert tuple(a.images.shape) == (self.batch_size, 3, *adapter.image_size(sched))
        assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1

    def test_kv_cached_sampler_logits_equal_a_teacher_forced_pass(self, adapter, batch):
        sched, cond = self.generate_schedule(adapter), self._cond(adapter, batch)
        gen = self._generate(adapter, cond, 1)
        assert len(gen.guided_logits) == len(sched)
        B, cfg = self.batch_size, float(self.sample_cfg)
        with torch.no_grad():
            x = adapter.teacher_inputs(gen.codes, sched)
            logits = adapter.forward(adapter.cfg_condition(cond), torch.cat([x, x]), sched).float()
        atol, rtol = self.sampler_tol
        for k in range(len(sched)):
            sl = sched.slice(k)
            want = self.sampler_guided_logits(adapter, logits[:B, sl], logits[B:, sl], k, len(sched), cfg)
            torch.testing.assert_close(gen.guided_logits[k].float(), want, atol=atol, rtol=rtol,
                                       msg=lambda m, k=k: f"scale {k}: {m}")

    # ---------------------------------------------------------------- checkpoints
    def test_save_load_is_bit_exact(self, adapter, batch, gt, tmp_path):
        tok, bb = self.save_load_paths(tmp_path)
        adapter.save(tok, bb)
        loaded = type(adapter).load(tok, bb, overrides=self.load_overrides(adapter))
        loaded.backbone.eval()
        loaded.condition_dropout = 0.0
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        assert same_codes(loaded.encode(batch.images, sched), gt)
        x = adapter.teacher_inputs(gt, sched)
        assert torch.equal(loaded.teacher_inputs(gt, sched), x)
        with torch.no_grad():
            assert torch.equal(loaded.forward(cond, x, sched), adapter.forward(cond, x, sched))

    def test_foreign_and_truncated_checkpoints_raise_checkpoint_error(self, adapter, tmp_path):
        tok, bb = self.save_load_paths(tmp_path)
        adapter.save(tok, bb)
        cls = type(adapter)
        for foreign in self.foreign_checkpoints(tmp_path):
            with pytest.raises(CheckpointError):
                cls.load(foreign, bb)
            with pytest.raises(CheckpointError):
                cls.load(tok, foreign)
        for good, which in ((tok, 0), (bb, 1)):
            cut = tmp_path / f"truncated_{which}.pth"
            data = good.read_bytes()
            cut.write_bytes(data[: len(data) // 2])
            with pytest.raises(CheckpointError):
                cls.load(*((cut, bb) if which == 0 else (tok, cut)))

    # ---------------------------------------------------------------- SAR step
    @pytest.mark.parametrize("rollout_name,loss_name", ROLLOUT_LOSSES)
    def test_sar_step_gives_finite_losses_and_gradients(self, adapter, batch, gt, rollout_name, loss_name):
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        rollout = BUILTIN_ROLLOUTS[rollout_name]()
        loss = BUILTIN_LOSSES[loss_name]() if loss_name else None
        adapter.backbone.train()
        adapter.backbone.zero_grad(set_to_none=True)
        res = sar_step(adapter, adapter.backbone, cond, gt, sched, rollout, loss, 0.5,
                       generator=torch.Generator().manual_seed(0), rng=random.Random(0))
        res.total.backward()
        for name in ("loss_tf", "loss_csf", "total"):
            assert torch.isfinite(getattr(res, name)), name
        if rollout.active:
            # soft: a KL of nearly equal distributions (untrained model) is 0 up to rounding
            floor = -1e-6 if loss_name == "soft" else 0.0
            assert res.student is not None and float(res.loss_csf.detach()) > floor
        grads = [p.grad for p in adapter.backbone.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        adapter.backbone.zero_grad(set_to_none=True)
        adapter.backbone.eval()

    @pytest.mark.parametrize("rollout_name,loss_name,options", [
        ("ssr", "hard", {}), ("ssr", "soft", {"sampling": "sample", "cfg": 1.5, "scales": "random"}),
        ("official", "naive", {"sampling": "argmax"})])
    def test_memory_lean_backward_equals_single_backward(self, adapter, batch, gt, rollout_name, loss_name,
                                                         options):
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        rollout, loss = BUILTIN_ROLLOUTS[rollout_name](**options), BUILTIN_LOSSES[loss_name]()
        runs = []
        for lean in (True, False):
            adapter.backbone.zero_grad(set_to_none=True)
            res = sar_step(adapter, adapter.backbone, cond, gt, sched, rollout, loss, 0.3,
                           generator=torch.Generator().manual_seed(0), rng=random.Random(0),
                           backward=(lambda l: l.backward()) if lean else None)
            if not lean:
                res.total.backward()
            runs.append((res.total.detach(), {n: p.grad.clone() for n, p in adapter.backbone.named_parameters()
                                              if p.grad is not None}))
        adapter.backbone.zero_grad(set_to_none=True)
        (t1, g1), (t2, g2) = runs
        torch.testing.assert_close(t1, t2, atol=1e-6, rtol=1e-6)
        assert g1.keys() == g2.keys() and g1
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    def test_ssr_with_perfect_predictions_reproduces_teacher_forcing(self, adapter, batch, gt):
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)

        class Oracle(BUILTIN_ROLLOUTS["ssr"]):
            def predict(self, *args, **kwargs):
                return list(gt)

        with torch.no_grad():
            res = sar_step(adapter, adapter.backbone, cond, gt, sched, Oracle(), BUILTIN_LOSSES["soft"]())
        sp = res.student
        assert sp.scales == tuple(range(1, len(sched)))
        atol, rtol = self.forward_tol
        torch.testing.assert_close(sp.logits, sp.teacher_logits, atol=atol, rtol=rtol)
        assert abs(float(res.loss_csf)) < 1e-5   # KL of identical distributions

    # ---------------------------------------------------------------- speed / memory paths
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

    def test_prefix_reuse_equals_a_full_second_pass(self, adapter, batch, gt):
        """``reuses_prefix``: ssr scales=last runs pass 2 on the last scale with pass 1's
        prefix keys / values; gradients equal a full second pass."""
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        ssr = BUILTIN_ROLLOUTS["ssr"]
        fast = ssr(scales="last")
        if not adapter.reuses_prefix:
            assert fast.prefix_length(adapter, sched) is None
            return
        assert fast.prefix_length(adapter, sched) == sched.offsets[-2]
        for loss_name in ("hard", "soft"):
            self._assert_same_grads(self._step_grads(adapter, cond, gt, sched, fast, loss_name),
                                    self._step_grads(adapter, cond, gt, sched, ssr(scales="last", reuse_prefix=False),
                                                     loss_name))

    def test_prefix_stable_logits_do_not_depend_on_later_scales(self, adapter, batch, gt):
        """``prefix_stable``: a pass over the schedule's first j scales gives the same
        logits as the first j scales of the full pass (the exposure gap relies on it)."""
        if not adapter.prefix_stable:
            return
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        x[:, input_slice(sched, len(sched) - 1)] += 1.0  # later inputs must not leak back
        full = adapter.forward(cond, x, sched)
        atol, rtol = self.forward_tol
        for j in range(2, len(sched)):
            n = sched.offsets[j]
            part = adapter.forward(cond, x[:, :n - sched.first_len], sched.first(j))
            assert part.shape[1] == n
            torch.testing.assert_close(part, full[:, :n], atol=atol, rtol=rtol, msg=lambda m, j=j: f"first {j}: {m}")

    def test_guided_null_rows_without_gradients_equal_the_joint_pass(self, adapter, batch, gt):
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        official = BUILTIN_ROLLOUTS["official"]
        # top-k 1: draws are the argmax, so sampling fewer scales cannot change them
        self._assert_same_grads(self._step_grads(adapter, cond, gt, sched, official(top_k=1)),
                                self._step_grads(adapter, cond, gt, sched, official(top_k=1, upstream_exact=True)))

    def test_activation_checkpointing_keeps_gradients(self, adapter, batch, gt):
        from sar_core.train.activation_ckpt import apply_activation_checkpointing

        blocks = adapter.transformer_blocks()
        if not blocks:
            with pytest.raises(ValueError, match="transformer blocks"):
                apply_activation_checkpointing(blocks, "full")
            return
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        rollout = BUILTIN_ROLLOUTS["ssr"](scales="all")
        ref = self._step_grads(adapter, cond, gt, sched, rollout)
        keys = list(adapter.backbone.state_dict())
        try:
            for mode in ("full", "selective"):
                assert apply_activation_checkpointing(blocks, mode) == len(blocks)
                assert list(adapter.backbone.state_dict()) == keys
                self._assert_same_grads(self._step_grads(adapter, cond, gt, sched, rollout), ref)
        finally:
            apply_activation_checkpointing(blocks, "none")

    # ---------------------------------------------------------------- autocast
    def test_tokenizer_work_is_safe_under_cpu_bf16_autocast(self, adapter, batch, gt):
        sched = self.schedule(adapter)
        pred = [wrong_codes(g, adapter.code_space) for g in gt]
        ks = list(range(len(sched) - 1))
        tf, st = adapter.teacher_inputs(gt, sched), adapter.stagger_inputs(gt, pred, sched, ks)
        img = adapter.decode(gt, sched)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            gt_a = adapter.encode(batch.images, sched)
            tf_a = adapter.teacher_inputs(gt, sched)
            st_a = adapter.stagger_inputs(gt, pred, sched, ks)
            img_a = adapter.decode(gt, sched)
        assert same_codes(gt_a, gt), "encode under autocast gives other codes"
        for got, want in ((tf_a, tf), (st_a, st), (img_a, img)):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
