"""Checks of the condition payloads an adapter declares (``condition_payloads``) and of
encoder-derived null payloads (``set_null_payloads``)."""

from __future__ import annotations

import pytest
import torch

from sar_core.adapter import ScaleWiseAdapter
from sar_core.batch import Batch
from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import pinned


class PayloadChecks(ContractBase):
    def test_batch_payloads_are_the_declared_ones(self, adapter, batch):
        """``make_batch``'s payloads pass the adapter's own check (widths, rows), ``condition``
        works on the declared payloads alone, and refuses a batch without a required payload
        with an error naming it (never a silent default)."""
        adapter.check_payloads(batch.conditions, "make_batch")
        declared = {k: v for k, v in batch.conditions.items() if k in adapter.condition_payloads}
        adapter.condition(Batch(labels=batch.labels, images=batch.images, conditions=declared))
        for name, spec in adapter.condition_payloads.items():
            if not spec.required:
                continue
            rest = {k: v for k, v in batch.conditions.items() if k != name}
            with pytest.raises((ValueError, KeyError), match=name):
                adapter.condition(Batch(labels=batch.labels, images=batch.images, conditions=rest))

    def test_example_batch_is_what_condition_reads(self, adapter):
        """``example_batch`` (what ``sar plan`` traces): images of the training size and the
        declared payloads, which pass the adapter's own check and its ``condition``; the
        default refuses, naming the fix, payloads declared without a width."""
        needed = [s for s in adapter.condition_payloads.values() if s.required or adapter.num_classes is None]
        if type(adapter).example_batch is ScaleWiseAdapter.example_batch and any(s.dim is None for s in needed):
            with pytest.raises(ValueError, match="override example_batch"):
                adapter.example_batch(2, condition_tokens=3)
            return
        eb = adapter.example_batch(2, condition_tokens=3, generator=torch.Generator().manual_seed(5))
        assert tuple(eb.images.shape[-2:]) == tuple(adapter.training_image_size(adapter.schedule_sampler()))
        assert eb.images.shape[:2] == (2, 3) and bool((eb.images.abs() <= 1).all())
        adapter.check_payloads(eb.conditions, "example_batch")
        adapter.condition(eb)

    def test_encoded_null_payloads_drive_guidance_and_dropout_and_stay_out_of_checkpoints(
            self, adapter, batch, gt, tmp_path):
        """For payloads whose null is encoder-derived: without them ``null_condition`` fails
        naming --null-payload; other null payloads change the null logits, condition
        dropout uses the ones given last, and a saved and reloaded model holds none."""
        names = [k for k, s in adapter.condition_payloads.items() if s.encoded_null]
        if not names:
            return
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        with torch.no_grad():
            before = adapter.forward(adapter.null_condition(cond), x, sched)
            adapter.set_null_payloads(self.make_null_payloads(adapter, torch.Generator().manual_seed(12)))
            after = adapter.forward(adapter.null_condition(cond), x, sched)
            with pinned(adapter, training=True, dropout=1.0):
                dropped = adapter.forward(cond, x, sched)
        assert not torch.allclose(before, after), "other null payloads gave the same null logits"
        atol, rtol = self.forward_tol
        torch.testing.assert_close(dropped, after, atol=atol, rtol=rtol)
        tok, bb = self.save_load_paths(tmp_path)
        adapter.save(tok, bb)
        loaded = type(adapter).load(tok, bb, overrides=self.load_overrides(adapter))
        for name in names:
            with pytest.raises(ValueError, match="--null-payload"):
                loaded.null_payload(name)
        with pytest.raises(ValueError, match="null payload"):
            loaded.null_condition(loaded.condition_to(loaded.condition(batch), loaded.device))
