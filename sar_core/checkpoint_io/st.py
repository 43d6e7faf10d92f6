""".safetensors files: what Hub users expect, read without pickle and mapped zero-copy.

A flat ``{name: tensor}`` state dict is written as a plain safetensors file (any tool
reads it). Anything else (a run checkpoint: optimizer state with integer keys, RNG
states, numbers, strings, nested layouts) is written as its tensors under path-like
names plus the rest of the tree as JSON in the header's metadata (key :data:`TREE`);
:func:`read` rebuilds the same object. Nothing is unpickled either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sar_core import CheckpointError  # torch is imported where tensors are handled

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
TREE = "sar.tree"


def is_safetensors(path: Any) -> bool:
    return str(path).endswith(SUFFIX)


def _module():
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - a dependency of sar
        raise CheckpointError("reading or writing .safetensors needs the 'safetensors' package") from None
    return safetensors


def _flat(obj: Any) -> bool:
    import torch

    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def encode(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """(tensors by name, metadata): a flat state dict as it is, anything else as a tree."""
    import torch

    if _flat(obj):
        return dict(obj), None
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path or "tensor"
            tensors[name] = x
            return {"t": name}
        if isinstance(x, dict):
            return {"m": [[k, enc(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        if isinstance(x, (list, tuple)):
            items = [enc(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
            return {"l" if isinstance(x, list) else "u": items}
        if x is None or isinstance(x, (bool, int, float, str)):
            return {"v": x}
        raise TypeError(f"cannot store a {type(x).__name__} in a .safetensors checkpoint (at {path or 'top'})")

    tree = enc(obj, "")
    return tensors, {TREE: json.dumps(tree)}


def decode(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Any:
    if not metadata or TREE not in metadata:
        return tensors

    def dec(node: dict) -> Any:
        (kind, value), = node.items()
        if kind == "t":
            return tensors[value]
        if kind == "m":
            return {k: dec(v) for k, v in value}
        if kind == "l":
            return [dec(v) for v in value]
        if kind == "u":
            return tuple(dec(v) for v in value)
        return value

    try:
        return dec(json.loads(metadata[TREE]))
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"the {TREE} header of this .safetensors file is damaged ({exc})") from None


def _separate(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each tensor alone and contiguous: copy only the ones that are not
    (views of a larger storage, a storage seen twice, non-contiguous layouts)."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if v.device.type != "cpu":
            v = v.cpu()
        st = v.untyped_storage()
        whole = v.storage_offset() == 0 and st.nbytes() == v.numel() * v.element_size()
        if not v.is_contiguous() or not whole or (v.numel() and st.data_ptr() in seen):
            v = v.contiguous().clone()
        if v.numel():
            seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def write(obj: Any, path: str | Path) -> None:
    """Write ``obj`` to ``path`` (not atomic by itself: see ``atomic_save``)."""
    tensors, metadata = encode(obj)
    _module().torch.save_file(_separate(tensors), str(path), metadata=metadata)


def read(path: str | Path) -> Any:
    """The object written by :func:`write` (tensors memory-mapped, copy-on-write)."""
    st = _module()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    return decode(tensors, metadata) if st else tensors
