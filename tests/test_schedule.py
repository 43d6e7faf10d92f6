"""Scale schedules: sizes, offsets and the block-causal mask."""

import random

import pytest
import torch

from sar_core.schedule import Schedule, ScheduleSampler


def test_square_schedule_sizes():
    s = Schedule([1, 2, 3, 4, 6, 8])
    assert s.is_square and s.sides == (1, 2, 3, 4, 6, 8)
    assert s.token_counts == (1, 4, 9, 16, 36, 64)
    assert s.total_tokens == 130 and s.offsets[-1] == 130
    assert s.slice(2) == slice(5, 14)
    assert str(s) == "1_2_3_4_6_8"


def test_non_square_and_infinity_triples():
    s = Schedule([(1, 1, 1), (1, 2, 3), (1, 4, 6)])
    assert s.scales == ((1, 1), (2, 3), (4, 6))
    assert not s.is_square
    assert s.token_counts == (1, 6, 24)
    with pytest.raises(ValueError):
        s.sides
    with pytest.raises(ValueError):
        Schedule([(2, 3, 4)])


def test_parse_roundtrip():
    assert Schedule.parse("1_2_3") == Schedule([1, 2, 3])
    assert Schedule.parse("1,2, 4") == Schedule([1, 2, 4])
    assert Schedule.parse("1x1_2x3") == Schedule([(1, 1), (2, 3)])
    s = Schedule([(1, 1), (2, 3)])
    assert Schedule.parse(s.to_list()) == s
    with pytest.raises(ValueError):
        Schedule([])
    with pytest.raises(ValueError):
        Schedule([0, 1])


@pytest.mark.parametrize("scales", [[1, 2, 3], [(1, 1), (2, 3), (3, 5)], [2, 4]])
def test_block_causal_mask(scales):
    s = Schedule(scales)
    m = s.attention_mask()
    ids = s.scale_ids()
    L = s.total_tokens
    assert m.shape == (L, L) and m.dtype == torch.bool
    for a in range(L):
        for b in range(L):
            assert bool(m[a, b]) == bool(ids[b] <= ids[a])
    # every token sees itself, and the first scale sees nothing beyond itself
    assert m.diagonal().all()
    assert not m[: s.first_len, s.first_len:].any()
    bias = s.attention_bias()
    assert bias.shape == (1, 1, L, L)
    assert torch.equal(bias[0, 0] == 0, m)
    assert torch.isinf(bias[0, 0][~m]).all()


def test_schedule_is_hashable_and_comparable():
    assert {Schedule([1, 2]): 1}[Schedule((1, 2))] == 1
    assert Schedule([1, 2]) != Schedule([1, 3])


def test_sampler_state_roundtrip():
    class Rand(ScheduleSampler):
        def sample(self):
            return Schedule([1] + sorted(self.rng.sample(range(2, 9), 3)))

    a = Rand(Schedule([1]), seed=3)
    a.sample()
    state = a.state_dict()
    want = [a.sample() for _ in range(4)]
    b = Rand(Schedule([1]), seed=99)
    b.load_state_dict(state)
    assert [b.sample() for _ in range(4)] == want
    assert ScheduleSampler(Schedule([1, 2]), 0).sample() == Schedule([1, 2])
