"""The contract suite sees bugs inside the transformer blocks of shipped families.

Each test injects one block-level bug (monkeypatch) into a shipped family and asserts that
a check of the suite fails on it, after asserting that the same check passes the intact
family. Under upstream-style init (near-identity blocks) these bugs passed every check;
the suite now re-draws the weights first (``adapter.liven``). The VAR tests also show the
blind spot it closes: with ``liven_seed = None`` (upstream init) the bug goes unseen.
"""

from pathlib import Path

import pytest
import torch

import test_contract
import test_infinity_contract
from sar_adapters.infinity.backbone import Infinity
from sar_adapters.infinity.rope import rope_table
from sar_adapters.var.backbone import VAR

FIX = Path(__file__).parent / "fixtures"


def prepared(suite):
    adapter = suite.prepared_adapter()
    batch = suite.make_batch(adapter, suite.batch_size, torch.Generator().manual_seed(0))
    return adapter, batch, adapter.encode(batch.images, suite.schedule(adapter))


def full_attention_when_teacher_forced(monkeypatch):
    """VAR's teacher-forced pass attends to every token (its KV-cached sampler stays causal)."""
    plain = VAR.layout

    def layout(self, schedule, device):
        lvl, rows, bias = plain(self, schedule, device)
        return lvl, rows, torch.zeros_like(bias)

    monkeypatch.setattr(VAR, "layout", layout)


def test_var_with_full_attention_in_the_teacher_forced_pass_fails_the_suite(monkeypatch):
    suite = test_contract.TestVARContract()
    adapter, batch, gt = prepared(suite)
    suite.test_teacher_forced_logits_read_no_later_scale(adapter, batch, gt)
    suite.test_kv_cached_sampler_logits_equal_a_teacher_forced_pass(adapter, batch)
    suite.test_prefix_stable_logits_do_not_depend_on_later_scales(adapter, batch, gt)

    full_attention_when_teacher_forced(monkeypatch)
    with pytest.raises(AssertionError, match="sees later scales"):
        suite.test_teacher_forced_logits_read_no_later_scale(adapter, batch, gt)
    with pytest.raises(AssertionError, match="scale"):
        suite.test_kv_cached_sampler_logits_equal_a_teacher_forced_pass(adapter, batch)
    with pytest.raises(AssertionError, match="first"):
        suite.test_prefix_stable_logits_do_not_depend_on_later_scales(adapter, batch, gt)

    suite.liven_seed = None   # upstream init: the blocks are near-identity and the bug hides
    adapter, batch, gt = prepared(suite)
    suite.test_kv_cached_sampler_logits_equal_a_teacher_forced_pass(adapter, batch)
    suite.test_prefix_stable_logits_do_not_depend_on_later_scales(adapter, batch, gt)


def rope_scaled_by_the_schedule(monkeypatch):
    """A wrong coefficient in Infinity's RoPE: positions scaled to the schedule's own last
    grid instead of the template's 1M grid, so they move when the schedule is cut."""

    def rope(self, schedule):
        return rope_table(schedule, schedule[-1], self.cfg.embed_dim // self.cfg.num_heads)

    monkeypatch.setattr(Infinity, "rope", rope)


def test_infinity_with_a_wrong_rope_coefficient_fails_the_suite(monkeypatch):
    suite = test_infinity_contract.TestInfinityContract()
    adapter, batch, gt = prepared(suite)
    suite.test_prefix_stable_logits_do_not_depend_on_later_scales(adapter, batch, gt)

    rope_scaled_by_the_schedule(monkeypatch)
    with pytest.raises(AssertionError, match="first"):
        suite.test_prefix_stable_logits_do_not_depend_on_later_scales(adapter, batch, gt)


def test_the_block_check_fails_near_identity_blocks():
    """Upstream's init: skipping a block of VAR changes the logits by ~1e-5 only."""
    suite = test_contract.TestVARContract()
    suite.test_every_block_changes_the_teacher_forced_logits(*prepared(suite))
    suite.liven_seed = None
    with pytest.raises(AssertionError, match="near-identity"):
        suite.test_every_block_changes_the_teacher_forced_logits(*prepared(suite))


def test_a_block_that_is_never_called_fails_the_block_check(monkeypatch):
    suite = test_contract.TestFlexVARContract()
    adapter, batch, gt = prepared(suite)
    listed = list(adapter.transformer_blocks())
    monkeypatch.setattr(type(adapter), "transformer_blocks", lambda self: listed + [torch.nn.Linear(2, 2)])
    with pytest.raises(AssertionError, match="never called"):
        suite.test_every_block_changes_the_teacher_forced_logits(adapter, batch, gt)


def test_the_shipped_var_golden_case_sees_full_attention(monkeypatch):
    """The public golden cases were made from livened weights too: VAR's catches the bug."""
    from sar_core.conformance import run_conformance
    from toy_adapter import make_registry

    full_attention_when_teacher_forced(monkeypatch)
    report = run_conformance(FIX / "var", registry=make_registry())
    failed = {r.key for r in report.results if r.status == "fail"}
    assert not report.passed and "tf_logits" in failed
