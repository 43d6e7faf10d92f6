"""Training data: datasets, a resumable sampler, per-item seeding, collate.

A dataset item is ``(x, target)``: ``x`` is an image float (3, H, W) in [-1, 1] or a list
of per-scale int64 code tensors (a pre-tokenised code cache: the frozen tokenizer is then
skipped); ``target`` is a class id, or a dict ``{"label": int (optional), "<name>": tensor
(n_i, D), ...}`` of per-sample condition payloads of varying length (e.g. text features).
A batch is a :class:`Batch` carrying ``images`` or ``codes``, the labels (or None) and the
payloads padded into :class:`Padded` with their lengths.

Determinism: the order of an epoch is a function of (seed, epoch) (a
``DistributedSampler``), and every item's random augmentations are drawn from RNGs seeded
by (seed, epoch, index) inside the item fetch, whatever worker process fetches it. A run
resumed at (epoch, batch) therefore sees exactly the batches an uninterrupted run sees,
with any number of DataLoader workers.

Size groups: a dataset that subclasses :class:`AspectGrouped` names a group per item
(e.g. the aspect-ratio bucket an image falls into, read from its header) and then every
micro-batch holds items of ONE group (:class:`GroupedBatchSampler`), with the same
determinism, rank-disjointness and resumability. Other datasets are sampled as before.
"""

from __future__ import annotations

import atexit
import contextlib
import random
import weakref
from pathlib import Path
from typing import Any, Callable, ContextManager, Hashable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from sar_core.batch import Batch, collate
from sar_core.data.finite import NonFiniteItem, check_finite  # noqa: F401  (NonFiniteItem: re-exported)


# ----------------------------------------------------------------------------- seeding
def item_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SeededItems(Dataset):
    """Fetches ``(epoch, index)`` items of ``dataset`` under RNGs seeded per item.

    The caller's python / numpy / torch RNG states are restored afterwards, so fetching in
    the main process (``workers=0``) does not disturb the training RNG stream. Every item is
    checked for NaN / Inf pixels and payloads before it reaches a batch (and the tokenizer):
    :class:`NonFiniteItem` names its index.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = item_seed(self.seed, epoch, index)
        py, npst = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % (2 ** 32))
                return check_finite(self.dataset[index], index)
        finally:
            random.setstate(py)
            np.random.set_state(npst)


class ResumableSampler(Sampler):
    """This rank's share of a shuffled epoch, as ``(epoch, index)`` keys, from an offset.

    Wraps ``DistributedSampler(shuffle=True, drop_last=True)``: every rank gets
    ``len(dataset) // world`` distinct items per epoch, in an order fixed by (seed, epoch).
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=seed, drop_last=True)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)
        self.inner.set_epoch(self.epoch)

    def __len__(self) -> int:
        return max(len(self.inner) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(self.inner)[self.start:]
        return iter([(self.epoch, i) for i in indices])


class AspectGrouped(Dataset):
    """Base of datasets whose items fall into size groups; a batch draws from one group.

    ``group_of(index)`` returns a hashable, orderable key (e.g. ``(H, W)`` of the item's
    bucket), computed cheaply (no image decode): the sampler asks it for every item once.
    """

    def group_of(self, index: int) -> Hashable:
        raise NotImplementedError


def size_buckets(paths: list, sizes: list) -> list[tuple[int, int]]:
    """The pixel (H, W) of ``sizes`` nearest in h/w to every image (read from its header
    only): the bucket an :class:`AspectGrouped` image dataset resizes it into."""
    from PIL import Image

    sizes = [tuple(int(v) for v in hw) for hw in sizes]
    out = []
    for p in paths:
        with Image.open(p) as img:
            r = img.height / img.width
        out.append(min(sizes, key=lambda hw: abs(hw[0] / hw[1] - r)))
    return out


class GroupedBatchSampler(Sampler):
    """This rank's micro-batches of ``(epoch, index)`` keys, each batch from one group.

    Per epoch, from (seed, epoch) only: one permutation of all items (as
    ``DistributedSampler``), split by group in that order, cut into global batches of
    ``micro_batch * world`` (remainders dropped), whose order is shuffled; rank ``r`` takes
    rows ``[r * micro_batch, (r + 1) * micro_batch)`` of each. Every rank thus gets distinct
    items and the same number of batches, and batch ``k`` of every rank is of one group.
    """

    def __init__(self, dataset: AspectGrouped, micro_batch: int, rank: int, world_size: int, seed: int):
        self.groups = [dataset.group_of(i) for i in range(len(dataset))]
        self.micro_batch, self.rank, self.world, self.seed = micro_batch, rank, world_size, int(seed)
        self.epoch, self.start = 0, 0
        self.batches_per_epoch = sum(n // (micro_batch * world_size) for n in self._counts().values())

    def _counts(self) -> dict:
        counts: dict = {}
        for g in self.groups:
            counts[g] = counts.get(g, 0) + 1
        return counts

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches (item indices) of ``epoch``, in order."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.groups), generator=gen).tolist()
        by_group: dict = {}
        for i in order:
            by_group.setdefault(self.groups[i], []).append(i)
        step, mb = self.micro_batch * self.world, self.micro_batch
        glob = [items[k:k + step] for g in sorted(by_group) for items in [by_group[g]]
                for k in range(0, len(items) - step + 1, step)]
        perm = torch.randperm(len(glob), generator=gen).tolist()
        return [glob[j][self.rank * mb:(self.rank + 1) * mb] for j in perm]

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.epoch_batches(self.epoch)[self.start:]
        return iter([[(self.epoch, i) for i in b] for b in batches])


_LIVE_STREAMS: "weakref.WeakSet[BatchStream]" = weakref.WeakSet()


@atexit.register
def _close_streams() -> None:
    # runs before multiprocessing's exit handler (registered earlier), which would
    # terminate() workers (SIGTERM, ignored by the trainer's workers) and join them
    for stream in list(_LIVE_STREAMS):
        stream.close()


class BatchStream:
    """Endless micro-batches across epochs with a resumable position (epoch, batch)."""

    def __init__(self, dataset: Dataset, micro_batch: int, rank: int, world_size: int, seed: int,
                 workers: int = 0, pin_memory: bool = False, worker_init_fn: Optional[Callable] = None,
                 spawn_guard: Optional[Callable[[], ContextManager]] = None):
        """``worker_init_fn`` runs first in every worker; ``spawn_guard()`` is entered while
        workers are started (the trainer's stop-signal policy, :mod:`sar_core.train.signals`)."""
        self.micro_batch, self.grouped = micro_batch, isinstance(dataset, AspectGrouped)
        self.spawn_guard = spawn_guard or contextlib.nullcontext
        common = dict(num_workers=workers, collate_fn=collate, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), worker_init_fn=worker_init_fn)
        if self.grouped:
            self.sampler = GroupedBatchSampler(dataset, micro_batch, rank, world_size, seed)
            self.batches_per_epoch = self.sampler.batches_per_epoch
            self.loader = DataLoader(SeededItems(dataset, seed), batch_sampler=self.sampler, **common)
        else:
            self.batches_per_epoch = len(dataset) // world_size // micro_batch
            self.sampler = ResumableSampler(dataset, rank, world_size, seed)
            self.loader = DataLoader(SeededItems(dataset, seed), batch_size=micro_batch, sampler=self.sampler,
                                     drop_last=True, **common)
        if self.batches_per_epoch < 1:
            per = "in any one size group " if self.grouped else ""
            raise ValueError(f"the dataset has {len(dataset)} items: too few {per}for {world_size} rank(s) x "
                             f"micro-batch {micro_batch}; lower --batch-size or add data")
        self.epoch, self.batch = 0, 0
        self._it: Optional[Iterator] = None
        _LIVE_STREAMS.add(self)

    def close(self) -> None:
        """Stop the loader's workers now (workers that ignore SIGTERM would make the
        interpreter's exit wait on them forever otherwise)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def set_position(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = int(epoch), int(batch)
        self._it = None

    def next(self) -> Batch:
        if self.batch >= self.batches_per_epoch:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self.sampler.set_position(self.epoch, self.batch if self.grouped else self.batch * self.micro_batch)
            with self.spawn_guard():
                self._it = iter(self.loader)
        b = next(self._it)
        self.batch += 1
        return b


# ----------------------------------------------------------------------------- datasets
def is_code_cache(spec: str | Path) -> bool:
    from sar_core.data.code_cache import META

    return Path(spec).is_dir() and (Path(spec) / META).is_file()


def image_hw(image_size: int | tuple[int, int] | list) -> tuple[int, int]:
    """An image size given as an int (square) or an (H, W) pair -> (H, W), both positive."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"an image size is an int or an (H, W) pair, got {image_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    return h, w


def parse_image_size(text: str | int) -> int | tuple[int, int]:
    """``"16"`` -> 16, ``"4x8"`` -> (4, 8) (the ``--image-size`` flags), with a clear error."""
    if isinstance(text, int):
        return size_option(text)
    parts = str(text).lower().replace(",", "x").split("x")
    try:
        return size_option(int(parts[0]) if len(parts) == 1 else tuple(int(p) for p in parts))
    except ValueError:
        raise ValueError(f"--image-size takes S (pixels a side) or HxW, e.g. 256 or 256x512; got {text!r}") from None


def size_option(image_size: int | tuple[int, int] | list) -> int | tuple[int, int]:
    """What a dataset factory's ``image_size`` gets: an int for a square size, else (H, W)."""
    h, w = image_hw(image_size)
    return h if h == w else (h, w)


#: folder names that mean a split: a folder so named is that split, never another one
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
#: ``--split .``: read the given folder itself, whatever it is named
THIS_FOLDER = "."


def split_folder(root: str | Path, split: Optional[str]) -> Path:
    """The folder holding split ``split`` of the image folder ``root``.

    ``root/<split>`` when it exists; ``root`` itself when it is named ``<split>`` (e.g.
    ``/data/imagenet/val`` for ``val``), when ``split`` is ``.`` (or empty), or, for
    ``train`` only, when ``root`` is a plain class folder (no sub-folder and not itself
    named like a split). Anything else raises a one-line ValueError naming what was looked
    for: a ``--data my/train`` read as split ``val`` would silently measure training images."""
    base = Path(root)
    if not split or split == THIS_FOLDER:
        return base
    if (base / split).is_dir():
        return base / split
    name = base.resolve().name
    if name == split:
        return base
    subs = {d.name.lower() for d in base.iterdir() if d.is_dir()} if base.is_dir() else set()
    if split == "train" and name.lower() not in SPLIT_NAMES and not subs & set(SPLIT_NAMES):
        return base
    raise ValueError(f"{base} has no '{split}' split: looked for the folder {base / split} and for {base} "
                     f"itself being named '{split}'; to read {base} itself pass --split {THIS_FOLDER} "
                     f"(a study file: val_split / reference_split '{THIS_FOLDER}'), or give the folder "
                     f"that holds {split}/")


def dataset_at(spec: str, names) -> Optional[tuple[str, str]]:
    """``NAME:FOLDER`` with NAME a registered dataset -> (NAME, FOLDER): the dataset reads
    that folder (its ``root`` option), e.g. ``--data textimages:/data/captioned``."""
    name, sep, root = str(spec).partition(":")
    if sep and name in names and root:
        return name, root
    return None


def open_training_data(spec: str, split: str, image_size: Optional[tuple[int, int]], options: dict, registry,
                       adapter=None, schedule=None) -> Dataset:
    """A code cache folder, a registered dataset name, or an image folder (read by the
    registered ``imagefolder`` dataset) -> Dataset. ``image_size`` is (H, W); dataset
    factories get an int for square sizes and the (H, W) pair otherwise."""
    if is_code_cache(spec):
        from sar_core.data.code_cache import CodeCacheDataset

        return CodeCacheDataset(spec, adapter=adapter, schedule=schedule, **options)
    opts = {"split": split, **options}
    if image_size is not None:
        opts["image_size"] = size_option(image_size)
    if str(spec) in registry.names("dataset"):
        return registry.get("dataset", str(spec))(**opts)
    at = dataset_at(spec, registry.names("dataset"))
    if at is not None:
        return registry.get("dataset", at[0])(**{**opts, "root": at[1]})
    if Path(spec).is_dir():
        return registry.get("dataset", "imagefolder")(root=str(spec), **opts)
    known = ", ".join(registry.names("dataset")) or "none"
    raise ValueError(f"--data '{spec}' is neither a registered dataset ({known}), NAME:FOLDER, an image "
                     "folder, nor a code cache folder")


def _accepts(factory: Callable, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def open_dataset(spec: str | Path, split: str = "train", image_size: int | tuple[int, int] | None = None,
                 deterministic: bool = False, **options) -> Dataset:
    """A registered dataset name, ``NAME:FOLDER`` (that dataset reading FOLDER), or a folder
    (read by the registered ``imagefolder`` dataset) -> a dataset of (image (3, H, W) in
    [-1, 1], target) items.

    ``image_size`` is an int (square) or an (H, W) pair; factories get an int for square
    sizes and the pair otherwise.
    ``deterministic`` asks the factory for ``augment=False`` (no random crops / flips:
    code caches and diagnostics must see every image the same way each time)."""
    from sar_core.plugins import get_registry

    reg = get_registry()
    opts = {"split": split, **options}
    if image_size is not None:
        from sar_core.data.datasets import size_option

        opts["image_size"] = size_option(image_size)
    from sar_core.data.datasets import dataset_at

    at = dataset_at(spec, reg.names("dataset"))
    if str(spec) in reg.names("dataset"):
        factory = reg.get("dataset", str(spec))
    elif at is not None:
        factory, opts["root"] = reg.get("dataset", at[0]), at[1]
    elif Path(spec).is_dir():
        factory, opts["root"] = reg.get("dataset", "imagefolder"), str(spec)
    else:
        known = ", ".join(reg.names("dataset")) or "none"
        raise ValueError(f"'{spec}' is neither a registered dataset ({known}), NAME:FOLDER, nor an existing folder")
    if deterministic and _accepts(factory, "augment"):
        opts["augment"] = False
    return factory(**opts)


