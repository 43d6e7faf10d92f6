"""Mixed aspect ratios on Infinity: images are bucketed by template, one bucket per batch,
each batch trained with its template's schedule; a crashed run resumes bit-exactly."""

import math

import pytest
import torch

import toy_adapter as toy
from sar_adapters.infinity.adapter import InfinityAdapter
from sar_adapters.infinity.data import AspectTextImageFolder, TextImageFolder, textimages
from sar_core.data.datasets import BatchStream
from test_infinity_data import make_folder
from test_infinity_train import MODEL, _CrashAt

SIZES = ((64, 64), (64, 48))  # (w, h): square and h/w = 0.75


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    make_folder(root, n=6, sizes=SIZES)
    return root


def _train(out, data, *extra):
    return toy.invoke("train", *MODEL, "--data", f"textimages:{data}", "--batch-size", "2", "--workers", "0",
                      "--loggers", "jsonl", "--lr", "1e-4", "--out", out, "--rollout", "ssr", "--csfl", "hard",
                      "--save-every", "1", "--steps", "4", *extra)


def test_square_data_is_not_bucketed_and_mixed_data_is(tmp_path, data):
    make_folder(tmp_path, n=4, sizes=((64, 64),))
    sizes = [[64, 64], [48, 64], [64, 48]]
    assert type(textimages(str(tmp_path), image_size=64, image_sizes=sizes)) is TextImageFolder
    ds = textimages(str(data), image_size=64, image_sizes=sizes)
    assert isinstance(ds, AspectTextImageFolder)
    assert [ds.group_of(i) for i in range(6)] == [(64, 64), (48, 64)] * 3
    stream = BatchStream(ds, micro_batch=2, rank=0, world_size=1, seed=0)
    shapes = [tuple(stream.next().images.shape[-2:]) for _ in range(4)]
    assert set(shapes) == {(64, 64), (48, 64)}


def test_mixed_ratios_train_per_template_and_resume_bit_exactly(tmp_path, data, monkeypatch):
    seen = []
    encode = InfinityAdapter.encode

    def spy(self, images, schedule):
        seen.append((tuple(images.shape[-2:]), tuple(self.image_size(schedule))))
        return encode(self, images, schedule)

    monkeypatch.setattr(InfinityAdapter, "encode", spy)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    r = _train(straight, data)
    assert r.exit_code == 0, r.output
    assert all(img == sched for img, sched in seen), seen  # every batch on its own template
    # 0.06M cuts templates to 7 scales: 16x16 (square) and 15x20 (h/w 0.75) at 4 px a token
    assert {img for img, _ in seen} == {(64, 64), (60, 80)}
    rows = toy.read_metrics(straight)
    assert [m["step"] for m in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(m[k]) for m in rows for k in ("loss", "loss_tf", "loss_csf", "grad_norm"))
    toy.use_registry(monkeypatch, _CrashAt(3))
    r = _train(crashed, data)
    assert r.exit_code != 0 and "simulated crash" in str(r.exception)
    toy.use_registry(monkeypatch)
    r = toy.invoke("train", "--out", crashed, "--resume")
    assert r.exit_code == 0, r.output
    a = {m["step"]: m for m in rows}
    b = {m["step"]: m for m in toy.read_metrics(crashed)}
    for s in (3, 4):
        for k in ("loss", "loss_tf", "loss_csf", "grad_norm"):
            assert a[s][k] == b[s][k], (s, k)



def test_template_sizes_and_schedules():
    from sar_adapters.infinity.templates import TEMPLATES
    from sar_core.schedule import ScheduleSampler
    from test_infinity_contract import TestInfinityContract

    adapter = TestInfinityContract().make_adapter()   # h/w 0.75, 0.06M, 2 px a token
    sampler = adapter.schedule_sampler()
    sizes = adapter.training_image_sizes(sampler)
    assert sizes[0] == (30, 40) and (32, 32) in sizes and len(sizes) == len(set(sizes)) == len(TEMPLATES)
    sched = adapter.schedule_for_image_size((32, 32), sampler.default)
    assert list(sched) == list(TEMPLATES[1.0][:7]) and adapter.image_size(sched) == (32, 32)
    with pytest.raises(ValueError, match="match no Infinity template"):
        adapter.schedule_for_image_size((32, 30), sampler.default)
    # the official rollout's [scale 0, scale k] pass of another template still finds its levels
    assert adapter.backbone.levels([(1, 1), (16, 16)]) == [0, 6]
    # families that train one size refuse other sizes (the contract's default)
    one = toy.ToyAdapter.from_config(toy.ToyConfig())
    assert one.training_image_sizes(ScheduleSampler(one.default_schedule)) == [one.image_size(one.default_schedule)]
    with pytest.raises(ValueError, match="resize the data to one size"):
        one.schedule_for_image_size((3, 5), one.default_schedule)
