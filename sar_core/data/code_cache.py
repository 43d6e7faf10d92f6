"""Pre-tokenised datasets: encode images once with the frozen tokenizer, train from codes.

SAR post-training never updates the tokenizer, so the codes of every training image are
fixed: :func:`build_code_cache` encodes a dataset once (optionally with its horizontally
flipped copies) into a folder that :class:`CodeCacheDataset` memory-maps::

    out_dir/
      meta.json          family, schedule, image size, tokenizer fingerprint, counts, dtype,
                         condition payloads (name -> trailing shape, total rows)
      labels.npy         int64 (N_items,), only when the dataset has class labels
      codes_00.npy ...   one per scale: (N_items, h*w) index codes, or (N_items, h*w, d) bits
      cond_<name>.bin    per-sample condition payloads (e.g. text features) of varying
                         length, float32 rows of every source item concatenated
      cond_<name>_offsets.npy  int64 (N_source + 1,): item i is rows offsets[i]:offsets[i+1]

Items ``0..N-1`` are the dataset's images in order; with ``flips`` items ``N..2N-1`` are
their mirror images (with the payloads of their originals). Dataset items are ``(image,
target)`` with ``target`` a class id or a dict ``{"label": int (optional), "<name>":
tensor (n_i, D), ...}`` (see :mod:`sar_core.data.datasets`); cache items come back the same way.
The cache belongs to one tokenizer and one schedule: opening it with
an adapter whose tokenizer weights differ (sha256 over the tokenizer state dict) or with
another schedule raises :class:`StaleCacheError`. A random-schedule family (FlexVAR's
random training schedules) can only train from the one cached schedule.

The folder is written under a temporary name (``.<name>.tmp-<host>-<pid>``) and renamed
when complete, so an interrupted run never leaves a cache that looks valid; the next build
of the same cache removes the temporary folders of killed builds
(:func:`remove_stale_builds`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sar_core.data.build_dirs import HOST as _HOST, remove_stale_builds
from sar_core.data.finite import check_batch
from sar_core.schedule import Schedule

CACHE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: labels.npy always, no payloads
META = "meta.json"


class StaleCacheError(ValueError):
    """A code cache does not belong to the tokenizer / schedule it is used with."""


def tokenizer_fingerprint(tokenizer: torch.nn.Module) -> str:
    """sha256 over the tokenizer's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(tokenizer.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _code_dtype(adapter) -> np.dtype:
    space = adapter.code_space
    if space.bitwise:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if space.vocab_size <= 65536 else np.dtype(np.int32)


def _image_of(item: Any) -> torch.Tensor:
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate(items: list) -> tuple[torch.Tensor, list]:
    from sar_core.batch import split_target

    targets = [split_target(it[1]) if isinstance(it, (tuple, list)) and len(it) > 1 else (None, {})
               for it in items]
    return torch.stack([_image_of(it) for it in items]), targets


class _PayloadWriter:
    """Streams one payload name's rows into ``cond_<name>.bin`` (float32) + offsets."""

    def __init__(self, folder: Path, name: str, n_src: int):
        self.name, self.fh = name, open(folder / f"cond_{name}.bin", "wb")
        self.offsets = np.zeros(n_src + 1, dtype=np.int64)
        self.folder, self.tail, self.row = folder, None, 0

    def add(self, item: int, value: torch.Tensor) -> None:
        v = value.detach().float().cpu().numpy()
        if self.tail is None:
            self.tail = list(v.shape[1:])
        elif list(v.shape[1:]) != self.tail:
            raise ValueError(f"condition payload '{self.name}' of item {item} has shape {tuple(v.shape)}; "
                             f"earlier items have (n, {', '.join(map(str, self.tail))})")
        self.fh.write(np.ascontiguousarray(v, dtype=np.float32).tobytes())
        self.row += len(v)
        self.offsets[item + 1] = self.row

    def close(self) -> dict:
        self.fh.close()
        np.save(self.folder / f"cond_{self.name}_offsets.npy", self.offsets)
        return {"tail": self.tail or [], "rows": int(self.row)}


def _record_targets(targets: list, row: int, labels: list, writers: dict, tmp: Path, n_src: int) -> None:
    for j, (label, payloads) in enumerate(targets):
        labels.append(label)
        if row + j == 0:
            writers.update({k: _PayloadWriter(tmp, k, n_src) for k in sorted(payloads)})
        if set(payloads) != set(writers):
            raise ValueError(f"item {row + j} has condition payloads {sorted(payloads)}, "
                             f"the first item has {sorted(writers)}")
        for k, v in payloads.items():
            writers[k].add(row + j, v)


def _check_image_size(dataset: Dataset, expected: tuple[int, int]) -> None:
    if len(dataset) == 0:
        raise ValueError("cannot cache an empty dataset")
    shape = tuple(_image_of(dataset[0]).shape)
    if shape[-2:] != tuple(expected):
        raise ValueError(f"dataset images are {shape[-2]}x{shape[-1]} but the schedule decodes "
                         f"{expected[0]}x{expected[1]} images; pass the matching image size")


def build_code_cache(adapter, dataset: Dataset, schedule: Schedule | str | None, out_dir: str | Path,
                     flips: bool = False, batch_size: int = 64, *, tokenizer_file: str | Path | None = None,
                     overwrite: bool = False, num_workers: int = 0,
                     progress: Optional[Callable[[int], None]] = None) -> Path:
    """Encode ``dataset`` (items ``(image in [-1, 1], target)``, see :mod:`sar_core.data.datasets`)
    into a cache folder."""
    schedule = Schedule.parse(schedule) if schedule is not None else adapter.default_schedule
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    image_hw = tuple(adapter.image_size(schedule))
    _check_image_size(dataset, image_hw)
    n_src = len(dataset)
    n_items = n_src * (2 if flips else 1)
    dtype = _code_dtype(adapter)
    limit = np.iinfo(dtype).max
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(out)
    tmp = out.parent / f".{out.name}.tmp-{_HOST}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers: dict = {}
    try:
        bits = adapter.bits_per_token
        arrays = [np.lib.format.open_memmap(tmp / f"codes_{k:02d}.npy", mode="w+", dtype=dtype,
                                            shape=(n_items, h * w) + ((bits,) if bits else ()))
                  for k, (h, w) in enumerate(schedule)]
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=_collate)
        device, row, labels = adapter.device, 0, []
        with torch.no_grad():
            for images, targets in loader:
                check_batch(images, row)  # before the tokenizer: a NaN image would get some code
                images = images.to(device)
                variants = [(0, images)] + ([(n_src, images.flip(-1))] if flips else [])
                for base, imgs in variants:
                    for k, codes in enumerate(adapter.encode(imgs, schedule)):
                        c = codes.cpu()
                        if c.min() < 0 or c.max() > limit:
                            raise ValueError(f"scale {k} codes outside 0..{limit} (dtype {dtype})")
                        arrays[k][base + row: base + row + len(c)] = c.numpy().astype(dtype)
                _record_targets(targets, row, labels, writers, tmp, n_src)
                row += len(targets)
                if progress is not None:
                    progress(len(targets))
        for a in arrays:
            a.flush()
        del arrays
        conditions = {k: w.close() for k, w in writers.items()}
        has_labels = _save_labels(tmp, labels, flips)
        meta = {
            "version": CACHE_VERSION, "family": adapter.name, "schedule": schedule.to_list(),
            "image_size": list(image_hw), "bits_per_token": adapter.bits_per_token, "dtype": dtype.name,
            "num_items": n_items, "num_source_items": n_src, "flips": bool(flips),
            "labels": has_labels, "conditions": conditions,
            "tokenizer_sha256": tokenizer_fingerprint(adapter.tokenizer),
            "tokenizer_file": str(tokenizer_file) if tokenizer_file else None,
            "tokenizer_file_sha256": file_sha256(tokenizer_file) if tokenizer_file else None,
            "dataset": repr(dataset)[:200], "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        for w in writers.values():
            w.fh.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _save_labels(folder: Path, labels: list, flips: bool) -> bool:
    """labels.npy when every item has a class label; none when no item has one."""
    present = {lab is not None for lab in labels}
    if present == {False}:
        return False
    if len(present) > 1:
        raise ValueError("some dataset items have a class label and some do not")
    arr = np.asarray(labels, dtype=np.int64)
    np.save(folder / "labels.npy", np.concatenate([arr, arr]) if flips else arr)
    return True


def read_meta(cache_dir: str | Path) -> dict:
    d = Path(cache_dir)
    path = d / META
    if not path.is_file():
        raise FileNotFoundError(f"{d} is not a code cache (no {META}); build one with `sar tokenize`")
    meta = json.loads(path.read_text())
    if meta.get("version") not in READABLE_VERSIONS:
        raise StaleCacheError(f"{d}: cache format version {meta.get('version')} != {CACHE_VERSION}; rebuild it")
    meta.setdefault("labels", True)
    meta.setdefault("conditions", {})
    return meta


def check_cache(meta: dict, adapter=None, schedule: Schedule | str | None = None, where: str = "cache") -> None:
    """Raise :class:`StaleCacheError` naming every mismatch with ``adapter`` / ``schedule``."""
    problems = []
    if schedule is not None and Schedule.parse(schedule).to_list() != meta["schedule"]:
        problems.append(f"schedule {Schedule.parse(schedule)} != cached {Schedule.parse(meta['schedule'])}")
    if adapter is not None:
        if adapter.name != meta["family"]:
            problems.append(f"family '{adapter.name}' != cached '{meta['family']}'")
        if adapter.bits_per_token != meta["bits_per_token"]:
            problems.append(f"bits per token {adapter.bits_per_token} != cached {meta['bits_per_token']}")
        elif tokenizer_fingerprint(adapter.tokenizer) != meta["tokenizer_sha256"]:
            problems.append("tokenizer weights differ from the ones the cache was encoded with "
                            f"(cached from {meta.get('tokenizer_file') or 'an in-memory tokenizer'})")
    if problems:
        raise StaleCacheError(f"stale code cache {where}: " + "; ".join(problems)
                              + ". Rebuild it with `sar tokenize` (or use images instead).")


class CodeCacheDataset(Dataset):
    """Items ``(codes per scale (list of int64 tensors), target)`` of a code cache.

    ``target`` is the class id (int64) for a cache of class labels only, else a dict
    ``{"label": id (when cached), "<name>": float32 (n_i, ...) payload, ...}``.
    ``flips``: 'random' (default; with a flipped cache each item is its original or its
    mirror image with p = 0.5, like random-flip augmentation), 'all' (2N items) or 'none'
    (originals only). Pass ``adapter`` / ``schedule`` to check the cache is not stale.
    """

    def __init__(self, cache_dir: str | Path, adapter=None, schedule: Schedule | str | None = None,
                 flips: str = "random"):
        if flips not in ("random", "all", "none"):
            raise ValueError(f"flips must be 'random', 'all' or 'none', got {flips!r}")
        self.dir = Path(cache_dir)
        self.meta = read_meta(self.dir)
        check_cache(self.meta, adapter, schedule, where=str(self.dir))
        self.schedule = Schedule.parse(self.meta["schedule"])
        self.flips = flips if self.meta["flips"] else "none"
        self.n_src = int(self.meta["num_source_items"])
        self.condition_names = sorted(self.meta["conditions"])
        self._arrays: Optional[list] = None
        self._labels: Optional[np.ndarray] = None
        self._payloads: Optional[dict] = None
        self._check_files()

    def _check_files(self) -> None:
        n = int(self.meta["num_items"])
        for k, (h, w) in enumerate(self.schedule):
            p = self.dir / f"codes_{k:02d}.npy"
            if not p.is_file():
                raise StaleCacheError(f"{self.dir}: {p.name} is missing; rebuild the cache")
            shape = np.load(p, mmap_mode="r").shape
            if shape[:2] != (n, h * w):
                raise StaleCacheError(f"{p}: shape {shape} does not match meta ({n}, {h * w})")
        if self.meta["labels"] and not (self.dir / "labels.npy").is_file():
            raise StaleCacheError(f"{self.dir}: labels.npy is missing; rebuild the cache")
        for name, info in self.meta["conditions"].items():
            self._check_payload(name, info)

    def _check_payload(self, name: str, info: dict) -> None:
        values, offsets = self.dir / f"cond_{name}.bin", self.dir / f"cond_{name}_offsets.npy"
        if not values.is_file() or not offsets.is_file():
            raise StaleCacheError(f"{self.dir}: the files of condition payload '{name}' are missing; "
                                  "rebuild the cache")
        off = np.load(offsets, mmap_mode="r")
        row_bytes = 4 * int(np.prod(info["tail"], dtype=np.int64))
        if (off.shape != (self.n_src + 1,) or int(off[-1]) != int(info["rows"])
                or values.stat().st_size != int(info["rows"]) * row_bytes):
            raise StaleCacheError(f"{self.dir}: condition payload '{name}' does not match meta "
                                  f"({info['rows']} rows of {info['tail']}); rebuild the cache")

    def _open(self) -> None:
        # opened lazily so that DataLoader workers each map the files themselves
        self._arrays = [np.load(self.dir / f"codes_{k:02d}.npy", mmap_mode="r") for k in range(len(self.schedule))]
        if self.meta["labels"]:
            self._labels = np.load(self.dir / "labels.npy", mmap_mode="r")
        self._payloads = {}
        for name, info in self.meta["conditions"].items():
            rows = int(info["rows"])
            values = (np.memmap(self.dir / f"cond_{name}.bin", dtype=np.float32, mode="r",
                                shape=(rows, *info["tail"])) if rows else np.zeros((0, *info["tail"]), np.float32))
            self._payloads[name] = (values, np.load(self.dir / f"cond_{name}_offsets.npy"))

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """Class ids of the items (None for a cache without labels)."""
        if self._arrays is None:
            self._open()
        if self._labels is None:
            return None
        return torch.from_numpy(np.array(self._labels[: len(self)], dtype=np.int64))

    def payload(self, name: str, i: int) -> torch.Tensor:
        """Condition payload ``name`` of item ``i`` (a mirror image has its original's)."""
        if self._arrays is None:
            self._open()
        values, offsets = self._payloads[name]
        j = i % self.n_src
        return torch.from_numpy(np.array(values[offsets[j]: offsets[j + 1]], dtype=np.float32))

    @property
    def num_classes(self) -> int:
        """Largest cached label + 1: the class ids this cache yields (checked against the model)."""
        return int(self.labels.max()) + 1 if len(self) else 0

    def __len__(self) -> int:
        return int(self.meta["num_items"]) if self.flips == "all" else self.n_src

    def __getitem__(self, i: int) -> tuple[list, Any]:
        if self._arrays is None:
            self._open()
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        if self.flips == "random" and bool(torch.rand(()) < 0.5):
            i += self.n_src
        codes = [torch.from_numpy(np.array(a[i], dtype=np.int64)) for a in self._arrays]
        label = None if self._labels is None else torch.tensor(int(self._labels[i]), dtype=torch.int64)
        if not self.condition_names:
            return codes, label
        target = {name: self.payload(name, i) for name in self.condition_names}
        if label is not None:
            target["label"] = label
        return codes, target

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = state["_labels"] = state["_payloads"] = None
        return state
