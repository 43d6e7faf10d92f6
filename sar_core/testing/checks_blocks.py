"""Checks that see inside the transformer blocks: the livened weights make every block
matter, and the teacher-forced pass reads exactly the scales its attention pattern allows.

Every other check compares two paths through the same blocks; with near-identity blocks
(upstream inits: AdaLN gates ~1e-5) a bug inside them (a mask, a rotary position) moves
the logits by less than any tolerance, so these checks first make sure the blocks count.
"""

from __future__ import annotations

import torch

from sar_core.sar.prefix_cache import scale_alone
from sar_core.schedule import ATTENTION_PATTERNS
from sar_core.testing.base import ContractBase
from sar_core.testing.helpers import input_slice


def _skipping(calls: list):
    """A forward hook that makes a block return its input (the block skipped)."""

    def hook(module, args, kwargs, output):
        calls.append(type(module).__name__)
        x = args[0] if args else next(iter(kwargs.values()))
        if not (isinstance(output, torch.Tensor) and isinstance(x, torch.Tensor) and output.shape == x.shape):
            raise AssertionError(f"{type(module).__name__} does not map a tensor to one of its shape; the "
                                 "block check skips a block by returning its first input")
        return x

    return hook


def _max_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


class BlockChecks(ContractBase):
    def test_liven_is_a_seeded_redraw_of_the_backbone(self, adapter):
        """``liven(generator)`` depends on the seed only: the same seed gives the same
        weights whatever they were, another seed other weights (golden cases rely on it)."""
        bb = adapter.backbone
        adapter.liven(torch.Generator().manual_seed(11))
        first = {n: p.detach().clone() for n, p in bb.named_parameters()}
        adapter.liven(torch.Generator().manual_seed(12))
        other = {n: p.detach().clone() for n, p in bb.named_parameters()}
        adapter.liven(torch.Generator().manual_seed(11))
        assert first and all(torch.equal(p, first[n]) for n, p in bb.named_parameters()), \
            "liven() with one seed gave other weights the second time"
        moved = [n for n, p in first.items() if p.numel() > 1 and not torch.equal(p, other[n])]
        assert moved, "liven() with another seed left every parameter as it was"

    def test_every_block_changes_the_teacher_forced_logits(self, adapter, batch, gt):
        """Skipping any one of ``transformer_blocks()`` changes the teacher-forced logits
        by more than ``block_effect``: no block is near-identity under livened weights.
        A family that lists no blocks has nothing to skip here."""
        blocks = list(adapter.transformer_blocks())
        if not blocks:
            return
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        with torch.no_grad():
            ref = adapter.forward(cond, x, sched)
            for i, block in enumerate(blocks):
                calls: list = []
                handle = block.register_forward_hook(_skipping(calls), with_kwargs=True)
                try:
                    out = adapter.forward(cond, x, sched)
                finally:
                    handle.remove()
                assert calls, f"block {i} of transformer_blocks() is never called by the teacher-forced pass"
                effect = _max_change(out, ref)
                assert effect > self.block_effect, (
                    f"skipping block {i} ({type(block).__name__}) changed the teacher-forced logits by "
                    f"{effect:.2e} only (block_effect {self.block_effect:g}): the block is near-identity, so "
                    "no check can see a bug inside it; liven() must re-draw its weights at a larger scale")

    def test_attention_pattern_is_one_the_contract_supports(self, adapter):
        assert adapter.attention in ATTENTION_PATTERNS, \
            f"attention {adapter.attention!r} is none of {', '.join(ATTENTION_PATTERNS)}"
        if adapter.attention == "within-scale":
            assert not adapter.reuses_prefix, "a within-scale family has no prefix to reuse: reuses_prefix False"

    def test_teacher_forced_logits_read_no_later_scale(self, adapter, batch, gt):
        """Changing the inputs of scale k leaves the logits of every coarser scale alone
        (the teacher-forced pass never sees a later scale) and changes scale k's; under
        block-causal attention it changes every finer scale's too, under within-scale
        attention none."""
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        g = torch.Generator().manual_seed(5)
        atol, rtol = self.forward_tol
        with torch.no_grad():
            ref = adapter.forward(cond, x, sched)
            for k in range(1, len(sched)):
                moved = x.clone()
                sl = input_slice(sched, k)
                moved[:, sl] += torch.randn(moved[:, sl].shape, generator=g).to(moved)
                out = adapter.forward(cond, moved, sched)
                n = sched.offsets[k]
                torch.testing.assert_close(
                    out[:, :n], ref[:, :n], atol=atol, rtol=rtol,
                    msg=lambda m, k=k: f"new inputs at scale {k} changed the logits of coarser scales: the "
                                       f"teacher-forced pass sees later scales (its attention mask?): {m}")
                own = _max_change(out[:, sched.slice(k)], ref[:, sched.slice(k)])
                assert own > self.block_effect, f"scale {k}'s logits do not read its own inputs ({own:.2e})"
                if k + 1 == len(sched):
                    continue
                rest = slice(sched.offsets[k + 1], None)
                if adapter.attention == "within-scale":
                    torch.testing.assert_close(
                        out[:, rest], ref[:, rest], atol=atol, rtol=rtol,
                        msg=lambda m, k=k: f"new inputs at scale {k} changed finer scales' logits, but the family "
                                           f"declares within-scale attention: {m}")
                    continue
                later = _max_change(out[:, rest], ref[:, rest])
                assert later > self.block_effect, (
                    f"new inputs at scale {k} changed no finer scale's logits ({later:.2e}): attention does not "
                    "reach earlier scales as block-causal attention does (declare attention = 'within-scale'?)")

    def test_within_scale_a_scale_alone_equals_the_full_pass(self, adapter, batch, gt):
        """``attention = "within-scale"``: scale k's logits are those of the pass over
        [scale 0, scale k] on scale k's inputs (what the core runs for a one-scale student
        pass). Block-causal families: nothing to check here."""
        if adapter.attention != "within-scale":
            return
        sched, cond = self.schedule(adapter), self._cond(adapter, batch)
        x = adapter.teacher_inputs(gt, sched)
        atol, rtol = self.forward_tol
        with torch.no_grad():
            full = adapter.forward(cond, x, sched)
            for k in range(1, len(sched)):
                short, logits = scale_alone(adapter.forward, cond, x, sched, k)
                assert tuple(logits.shape[:2]) == (self.batch_size, short.total_tokens)
                torch.testing.assert_close(logits[:, short.first_len:], full[:, sched.slice(k)], atol=atol, rtol=rtol,
                                           msg=lambda m, k=k: f"scale {k} alone: {m}")
