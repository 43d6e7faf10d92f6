"""Sampler throughput and the code cache's effect on an epoch (not part of the tests).

    .venv/bin/pytest benchmarks/test_sample_tokenize_bench.py --benchmark-only

Model: the same ``var`` config as ``test_step_bench.py`` (depth 6, width 384, schedule
1,2,3,4,5,6,8, batch 4). "Epoch" = one pass over 64 digits images producing the
per-scale codes a training step needs: from images (encoder every time) or from a
pre-tokenised memory-mapped cache (``sar tokenize``). The last test prints the ratio.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from sar_core.data.code_cache import CodeCacheDataset, build_code_cache
from sar_core.plugins import get_registry

from test_step_bench import BATCH, DEVICE, VAR_CONFIG

N_IMAGES = 64
RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    a = get_registry().get("adapter", "var").from_config(VAR_CONFIG).to(DEVICE)
    a.backbone.eval()
    return a


@pytest.fixture(scope="module")
def images(adapter):
    from sar_plugins.digits import digits

    size = adapter.image_size(adapter.default_schedule)[0]
    return Subset(digits("train", image_size=size), range(N_IMAGES))


def test_sampler_images_per_s(benchmark, adapter):
    labels = torch.arange(BATCH, device=DEVICE) % VAR_CONFIG["num_classes"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def sample():
        with torch.no_grad():
            adapter.generate(labels, adapter.default_schedule, cfg=1.5, top_k=900, top_p=0.95, generator=gen)

    benchmark.pedantic(sample, rounds=3, iterations=1, warmup_rounds=1)
    ips = BATCH / benchmark.stats.stats.mean
    benchmark.extra_info["images_per_s"] = ips
    RESULTS["sampler_images_per_s"] = ips
    assert ips > 0


def test_epoch_from_images(benchmark, adapter, images):
    def epoch():
        with torch.no_grad():
            for x, _ in DataLoader(images, batch_size=BATCH):
                adapter.encode(x.to(DEVICE), adapter.default_schedule)

    benchmark.pedantic(epoch, rounds=2, iterations=1, warmup_rounds=0)
    RESULTS["uncached_s"] = benchmark.stats.stats.mean


def test_epoch_from_cache(benchmark, adapter, images, tmp_path_factory):
    cache = build_code_cache(adapter, images, adapter.default_schedule, tmp_path_factory.mktemp("c") / "cache")
    data = CodeCacheDataset(cache, adapter, adapter.default_schedule)

    def epoch():
        for codes, _ in DataLoader(data, batch_size=BATCH):
            [c.to(DEVICE) for c in codes]

    benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=0)
    RESULTS["cached_s"] = benchmark.stats.stats.mean


def test_print_cache_ratio(capsys):
    if not {"uncached_s", "cached_s"} <= set(RESULTS):
        pytest.skip("run the whole file to compare")
    with capsys.disabled():
        print(f"\nepoch of {N_IMAGES} images on {DEVICE}: from images {RESULTS['uncached_s']:.3f} s, "
              f"from the code cache {RESULTS['cached_s']:.3f} s "
              f"(cached/uncached = {RESULTS['cached_s'] / RESULTS['uncached_s']:.3f}); "
              f"sampler {RESULTS.get('sampler_images_per_s', float('nan')):.2f} images/s at batch {BATCH}")
