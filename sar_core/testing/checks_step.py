"""Checks of one SAR step per rollout x loss, and of the speed / memory paths."""

from __future__ import annotations

import random

import pytest
import torch

from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.rollouts import BUILTIN_ROLLOUTS
from sar_core.sar.step import sar_step
from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import input_slice, same_codes, wrong_codes

#: (rollout, loss) pairs one ``sar_step`` runs with; ``none`` has no student pass.
ROLLOUT_LOSSES = [("none", None)] + [(r, l) for r in ("ssr", "official") for l in ("hard", "soft", "naive")]


class StepChecks(ContractBase):
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
        ("official", "naive", {"sampling": "argmax"}),
        ("ssr", "soft", {"depth": 2, "sampling": "sample", "cfg": 1.5})])
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

    def test_prefix_reuse_equals_a_full_second_pass(self, adapter, batch, gt):
        """``reuses_prefix``: ssr scales=last runs pass 2 on the last scale with pass 1's
        prefix keys / values; gradients equal a full second pass. Within-scale attention:
        a one-scale pass 2 (scales last or random) runs [scale 0, that scale] alone, no
        prefix recorded, with the gradients of a full second pass."""
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        ssr = BUILTIN_ROLLOUTS["ssr"]
        fast = ssr(scales="last")
        if adapter.attention == "within-scale":
            assert fast.prefix_length(adapter, sched) is None
            for scales in ("last", "random"):
                with torch.no_grad():
                    res = sar_step(adapter, adapter.backbone, cond, gt, sched, ssr(scales=scales),
                                   BUILTIN_LOSSES["hard"](), rng=random.Random(1))
                k = res.student.scales[0]
                assert res.student.scales == (k,) and res.student.schedule == sched.sub([0, k])
                self._assert_same_grads(
                    self._step_grads(adapter, cond, gt, sched, ssr(scales=scales)),
                    self._step_grads(adapter, cond, gt, sched, ssr(scales=scales, reuse_prefix=False)))
            return
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
        logits as the first j scales of the full pass (the exposure gap relies on it).
        Within-scale families are prefix-stable by construction: checked too."""
        if not (adapter.prefix_stable or adapter.attention == "within-scale"):
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
