"""Loading maps checkpoint files instead of copying them, saving copies nothing (issue 22,
item 1). The peak-RSS bound itself is measured in benchmarks/checkpoint_memory.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sar_core.checkpoint_io import assign_state, cpu_state, load_file, params_on_meta
from sar_core.plugins import get_registry

FIX = Path(__file__).parent / "fixtures"
PAIRS = {"var": ("var/vae_ch32v64z8.pth", "var/var_tiny_d2w64.pth"),
         "flexvar": ("flexvar/FlexVAE_tiny.pth", "flexvar/FlexVARd2-tiny.pth"),
         "infinity": ("infinity/infinity_vae_d16_tiny.pth", "infinity/infinity_tiny_d4c4w64.pth")}


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process' mappings of ``path`` (from /proc/self/maps)."""
    target = str(path.resolve())
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            out.append((lo, hi))
    return out


def mapped(t: torch.Tensor, ranges) -> bool:
    p = t.untyped_storage().data_ptr()
    return any(lo <= p < hi for lo, hi in ranges)


needs_proc = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("family", sorted(PAIRS))
def test_loaded_weights_are_the_files_mapped_pages(family, tmp_path):
    tok, bb = (shutil.copy(FIX / f, tmp_path / Path(f).name) for f in PAIRS[family])
    adapter = get_registry().get("adapter", family).load(Path(tok), Path(bb))
    for module, path in ((adapter.tokenizer, Path(tok)), (adapter.backbone, Path(bb))):
        ranges = file_mappings(path)
        assert ranges, f"{path.name} is not memory-mapped"
        params = dict(module.named_parameters())
        outside = [n for n, p in params.items() if not mapped(p, ranges)]
        assert not outside, f"{family}: parameters copied out of {path.name}: {outside[:5]}"
        assert not any(p.is_meta for p in params.values())


def test_load_file_maps_and_a_write_does_not_reach_the_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    before = path.read_bytes()
    sd = load_file(path)
    assert mapped(sd["w"], file_mappings(path))
    sd["w"].add_(1)  # private mapping: copy-on-write
    assert path.read_bytes() == before and float(sd["w"][0]) == 1.0


def test_legacy_format_files_still_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(load_file(path)["w"], torch.ones(3))


def test_params_on_meta_builds_buffers_and_assign_fills_parameters():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("mask", torch.tril(torch.ones(2, 2)))

    with params_on_meta():
        net = Net()
    assert net.lin.weight.is_meta and not net.mask.is_meta and torch.equal(net.mask, torch.tril(torch.ones(2, 2)))
    assert not torch.nn.Linear(1, 1).weight.is_meta  # patch undone
    w = torch.randn(2, 3, dtype=torch.float64)
    assign_state(net, {"lin.weight": w, "lin.bias": torch.zeros(2)}, "test")
    assert net.lin.weight.dtype == torch.float32 and torch.equal(net.lin.weight, w.float())
    assert isinstance(net.lin.weight, torch.nn.Parameter) and net.lin.weight.requires_grad
    with params_on_meta():
        half = Net()
    from sar_core.adapter import CheckpointError
    with pytest.raises(CheckpointError, match="lin.bias"):
        assign_state(half, {"lin.weight": torch.zeros(2, 3)}, "test")


class NewStorages(TorchDispatchMode):
    """Bytes of every new storage an op returns while active (clones, copies, casts; views
    such as ``detach`` of an existing storage are not new)."""

    def __init__(self, existing):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing}
        self.bytes, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                st = t.untyped_storage()
                if st.data_ptr() not in self.known:
                    self.known.add(st.data_ptr())
                    self.bytes += st.nbytes()
                    self.ops.append(str(func))
        return out


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_save_copies_no_tensor(family, tmp_path):
    tok, bb = PAIRS[family]
    adapter = get_registry().get("adapter", family).load(FIX / tok, FIX / bb)
    tensors = [t for m in (adapter.tokenizer, adapter.backbone) for t in m.state_dict().values()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    with NewStorages(tensors) as seen:
        adapter.save(tmp_path / "t.pth", tmp_path / "b.pth")
    assert seen.bytes < 0.01 * weights, f"saving allocated {seen.bytes} of {weights} bytes: {seen.ops[:8]}"
    back = get_registry().get("adapter", family).load(tmp_path / "t.pth", tmp_path / "b.pth")
    for a, b in ((adapter.backbone, back.backbone), (adapter.tokenizer, back.tokenizer)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cpu_state_compacts_views_only():
    big = torch.arange(10.0)
    own = torch.ones(3)
    out = cpu_state({"view": big[2:5], "own": own, "n": 3})
    assert out["own"] is not None and out["own"].data_ptr() == own.data_ptr()
    assert out["view"].untyped_storage().nbytes() == 12 and torch.equal(out["view"], big[2:5])
    assert out["n"] == 3
