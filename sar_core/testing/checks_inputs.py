"""Checks of codes, inputs, the student-forcing flag and conditions."""

from __future__ import annotations

import pytest
import torch

from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import code_shape, input_slice, pinned, wrong_codes


class InputChecks(ContractBase):
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
        token(s) of a short pass equal those of the full pass (no scale reads a later one)."""
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
