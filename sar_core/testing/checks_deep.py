"""Checks of the deeper ``ssr`` rollout (``depth`` > 1): the mixed code histories it builds
through ``adapter.mix_codes`` and ``adapter.teacher_inputs``, and its student passes."""

from __future__ import annotations

import pytest
import torch

from sar_core.sar.losses import BUILTIN_LOSSES
from sar_core.sar.rollouts import BUILTIN_ROLLOUTS
from sar_core.sar.step import sar_step
from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import input_slice, wrong_codes


class DeepRolloutChecks(ContractBase):
    def test_input_of_a_scale_reads_only_codes_below_it(self, adapter, gt):
        """The deeper passes build scale s's input from a history mixed per scale, which is
        what the sampler feeds only if scale s's input reads no code at s or above."""
        sched, space, K = self.schedule(adapter), adapter.code_space, len(self.schedule(adapter))
        tf = adapter.teacher_inputs(gt, sched)
        assert torch.equal(adapter.teacher_inputs(adapter.mix_codes(gt, {}), sched), tf)
        for s in range(1, K):
            later = adapter.mix_codes(gt, {t: wrong_codes(gt[t], space) for t in range(s, K)})
            x = adapter.teacher_inputs(later, sched)
            for r in range(1, s + 1):
                assert torch.equal(x[:, input_slice(sched, r)], tf[:, input_slice(sched, r)]), \
                    f"codes at scales >= {s} changed the input of scale {r}"

    def test_mixed_codes_rebuild_the_stagger_inputs(self, adapter, gt):
        sched, K = self.schedule(adapter), len(self.schedule(adapter))
        for k in range(K - 1):
            pred = [None] * K
            pred[k] = wrong_codes(gt[k], adapter.code_space)
            st = adapter.stagger_inputs(gt, pred, sched, [k])
            mixed = adapter.teacher_inputs(adapter.mix_codes(gt, {k: pred[k]}), sched)
            sl = input_slice(sched, k + 1)
            torch.testing.assert_close(mixed[:, sl], st[:, sl], atol=1e-6, rtol=1e-6)

    def test_deeper_ssr_passes_feed_their_own_predictions(self, adapter, batch, gt):
        """depth d = K-1: pass 2 is the one-step pass; pass j feeds scale s >= j-1 the history
        gt[..s-j], P1[s-j+1], ..., P_{j-1}[s-1], keeps teacher inputs below, supervises
        scales j-1..K-1 with gradients against detached targets; L_CSF is the passes' mean."""
        sched, cond, K = self.schedule(adapter), self._cond(adapter, batch), len(self.schedule(adapter))
        ssr, hard, bits = BUILTIN_ROLLOUTS["ssr"], BUILTIN_LOSSES["hard"](), adapter.bits_per_token
        if K < 3:
            with pytest.raises(ValueError, match="depth"):
                ssr(depth=2).check_schedule(sched)
            return
        deep = ssr(depth=K - 1)
        res = sar_step(adapter, adapter.backbone, cond, gt, sched, deep, hard, 0.5)
        one = sar_step(adapter, adapter.backbone, cond, gt, sched, ssr(), hard, 0.5)
        sps = res.students
        assert len(sps) == K - 1 and res.student is sps[0] and one.students == [one.student]
        atol, rtol = self.forward_tol
        torch.testing.assert_close(sps[0].inputs, one.student.inputs, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sps[0].logits, one.student.logits, atol=atol, rtol=rtol)
        tf = adapter.teacher_inputs(gt, sched)
        params = [p for p in adapter.backbone.parameters() if p.requires_grad]
        preds = [res.pred_codes]
        for j, sp in enumerate(sps, start=2):
            assert sp.scales == tuple(range(j - 1, K)) and sp.logits.shape[1] == sched.total_tokens - sched.offsets[j - 1]
            for s in range(1, K):
                want = tf if s < j - 1 else adapter.teacher_inputs(adapter.mix_codes(
                    gt, {t: preds[t - s + j - 1][t] for t in range(max(0, s - j + 1), s)}), sched)
                torch.testing.assert_close(sp.inputs[:, input_slice(sched, s)], want[:, input_slice(sched, s)],
                                           atol=1e-6, rtol=1e-6, msg=lambda m, j=j, s=s: f"pass {j} scale {s}: {m}")
            assert sp.logits.requires_grad and not sp.teacher_logits.requires_grad
            assert not sp.teacher_codes.is_floating_point() and not sp.inputs.requires_grad
            grads = torch.autograd.grad(hard(sp, bits).mean(), params, allow_unused=True, retain_graph=True)
            assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), f"pass {j} has no gradient"
            preds.append(deep.predict(adapter, sp.full.detach(), None, sched, None))
        per_pass = torch.stack([hard(sp, bits).mean() for sp in sps])
        torch.testing.assert_close(res.loss_csf, per_pass.mean())

        class Oracle(ssr):
            def predict(self, *args, **kwargs):
                return list(gt)

        with torch.no_grad():
            perfect = sar_step(adapter, adapter.backbone, cond, gt, sched, Oracle(depth=K - 1),
                               BUILTIN_LOSSES["soft"]())
        for sp in perfect.students:   # own predictions = ground truth: every pass is teacher forcing
            torch.testing.assert_close(sp.logits, sp.teacher_logits, atol=atol, rtol=rtol)
        assert abs(float(perfect.loss_csf)) < 1e-5
