"""Checks of the sampler and of checkpoints."""

from __future__ import annotations

import pytest
import torch

from sar_core.adapter import CheckpointError
from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import code_shape, same_codes


class ModelChecks(ContractBase):
    def test_seeded_generate_is_reproducible_and_follows_the_schedule(self, adapter, batch):
        sched, cond = self.generate_schedule(adapter), self._cond(adapter, batch)
        a, b = (self._generate(adapter, cond, s) for s in (5, 5))
        assert same_codes(a.codes, b.codes) and torch.equal(a.images, b.images)
        # a livened model can be peaked: one of four other seeds must draw other codes
        assert any(not same_codes(a.codes, self._generate(adapter, cond, s).codes) for s in (6, 7, 8, 9)), \
            "four other seeds drew the same codes"
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

    def test_tokenizer_only_load_encodes_as_the_full_load(self, adapter, batch, gt, tmp_path):
        """``load_tokenizer`` (``sar tokenize`` without a backbone): the same codes, inputs
        and images as the model loaded with its backbone."""
        tok, bb = self.save_load_paths(tmp_path)
        adapter.save(tok, bb)
        alone = type(adapter).load_tokenizer(tok, overrides=self.load_overrides(adapter))
        sched = self.schedule(adapter)
        assert alone.code_space == adapter.code_space
        assert tuple(alone.image_size(sched)) == tuple(adapter.image_size(sched))
        assert same_codes(alone.encode(batch.images, sched), gt)
        assert torch.equal(alone.teacher_inputs(gt, sched), adapter.teacher_inputs(gt, sched))
        assert torch.equal(alone.decode(gt, sched), adapter.decode(gt, sched))

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
