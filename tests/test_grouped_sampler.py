"""Aspect-grouped batching: one group per batch, deterministic, rank-disjoint, resumable."""

import pytest
import torch

from sar_core.data.datasets import AspectGrouped, BatchStream, GroupedBatchSampler


class Mixed(AspectGrouped):
    """Items of two sizes: a (3, 4, 4) square group and a (3, 3, 4) one; the target is the index."""

    def __init__(self, n_square: int, n_wide: int):
        self.sizes = [(4, 4)] * n_square + [(3, 4)] * n_wide

    def __len__(self):
        return len(self.sizes)

    def group_of(self, index):
        return self.sizes[index]

    def __getitem__(self, i):
        h, w = self.sizes[i]
        return torch.rand(3, h, w) * 2 - 1, i


def test_batches_hold_one_group_and_ranks_are_disjoint():
    data = Mixed(11, 9)
    ranks = [GroupedBatchSampler(data, micro_batch=2, rank=r, world_size=2, seed=3) for r in range(2)]
    assert ranks[0].batches_per_epoch == 2 + 2  # 11 // 4 + 9 // 4 global batches
    for epoch in range(3):
        per_rank = [s.epoch_batches(epoch) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == 4
        seen = [i for batches in per_rank for b in batches for i in b]
        assert len(seen) == len(set(seen)) == 16
        for k in range(4):  # batch k is one group on every rank
            groups = {data.group_of(i) for batches in per_rank for i in batches[k]}
            assert len(groups) == 1
    assert ranks[0].epoch_batches(0) != ranks[0].epoch_batches(1)  # reshuffled per epoch
    again = GroupedBatchSampler(data, micro_batch=2, rank=0, world_size=2, seed=3)
    assert again.epoch_batches(2) == ranks[0].epoch_batches(2)  # a function of (seed, epoch)
    assert GroupedBatchSampler(data, 2, 0, 2, seed=4).epoch_batches(2) != ranks[0].epoch_batches(2)


def test_grouped_stream_resumes_bit_exactly_with_workers():
    data = Mixed(7, 6)
    a = BatchStream(data, micro_batch=3, rank=0, world_size=1, seed=5)
    assert a.grouped and a.batches_per_epoch == 2 + 2
    seq = [a.next() for _ in range(10)]  # crosses two epoch boundaries
    assert {tuple(b.images.shape[-2:]) for b in seq} == {(4, 4), (3, 4)}
    b = BatchStream(data, micro_batch=3, rank=0, world_size=1, seed=5, workers=2)
    b.set_position(1, 2)
    for want in seq[6:]:
        got = b.next()
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


def test_no_group_large_enough_is_a_clear_error():
    with pytest.raises(ValueError, match="too few in any one size group"):
        BatchStream(Mixed(2, 2), micro_batch=3, rank=0, world_size=1, seed=0)


def test_imagefolder_buckets_mixed_ratios_only(tmp_path):
    from PIL import Image

    from sar_plugins.datasets import AspectImageFolder, ImageFolderDataset, imagefolder

    for name, (w, h) in {"sq": (20, 20), "wide": (40, 30), "sq2": (24, 24), "wide2": (32, 24)}.items():
        (tmp_path / "mixed" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (200, 10, 10)).save(tmp_path / "mixed" / "a" / f"{name}.png")
    (tmp_path / "square" / "a").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "square" / "a" / "x.png")
    sizes = [[16, 16], [12, 16], [16, 12]]
    assert type(imagefolder(str(tmp_path / "square"), image_size=16, image_sizes=sizes)) is ImageFolderDataset
    ds = imagefolder(str(tmp_path / "mixed"), image_size=16, image_sizes=sizes)
    assert isinstance(ds, AspectImageFolder)
    groups = {p.stem: ds.group_of(i) for i, (p, _) in enumerate(ds.items)}
    assert groups == {"sq": (16, 16), "sq2": (16, 16), "wide": (12, 16), "wide2": (12, 16)}
    stream = BatchStream(ds, micro_batch=2, rank=0, world_size=1, seed=1)
    shapes = {tuple(stream.next().images.shape[-2:]) for _ in range(2)}
    assert shapes == {(16, 16), (12, 16)}
