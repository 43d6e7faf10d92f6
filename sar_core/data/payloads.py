"""Condition payloads from files and datasets.

* ``--payload NAME=FILE`` (repeatable; ``--text-features FILE`` is ``--payload
  text_features=FILE``): FILE is a ``.pt`` list of (n_i, D) tensors (one per sample), a
  dict ``{"features": (N, N_max, D), "lengths": (N,)}``, or one tensor (N, D) (one row a
  sample, e.g. pooled vectors) / (N, n, D) (n rows each) -> :class:`~sar_core.batch.Padded`.
* Encoder-derived null payloads (the encoder's features of the empty prompt, in no
  checkpoint): ``--null-payload NAME=FILE`` (FILE: one (n, D) tensor, or a dict holding
  NAME) or ``--null-payload FILE`` (a dict name -> (n, D): every payload in it, e.g. the
  ``null_payloads.pt`` that ``sar encode-text`` writes). A dataset may offer them as its
  ``null_payloads`` attribute (``textimages``: ``null_payloads.pt`` in its folder).
* :func:`dataset_payloads`: the payloads one item of a dataset carries (checked against
  the adapter's ``condition_payloads`` before training / diagnosing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from sar_core.batch import Padded, split_target

NULL_FILE = "null_payloads.pt"


def padded_features(obj: Any, what: str = "text features") -> Padded:
    """A payload file's content (see the module text) -> :class:`~sar_core.batch.Padded`."""
    if isinstance(obj, Padded):
        return obj
    if isinstance(obj, torch.Tensor):
        if obj.dim() not in (2, 3) or obj.shape[0] < 1:
            raise ValueError(f"{what}: a tensor must be (N, D) (one row per sample) or (N, n, D), "
                             f"got {tuple(obj.shape)}")
        values = obj.float()[:, None] if obj.dim() == 2 else obj.float()
        return Padded(values, torch.full((values.shape[0],), values.shape[1], dtype=torch.int64))
    if isinstance(obj, (list, tuple)):
        if not obj or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 for t in obj):
            raise ValueError(f"{what}: a list needs one (n_i, D) tensor per sample")
        if len({tuple(t.shape[1:]) for t in obj}) > 1:
            raise ValueError(f"{what}: every (n_i, D) tensor of the list needs the same D")
        return Padded.pad([t.float() for t in obj])
    if isinstance(obj, dict) and set(obj) >= {"features", "lengths"}:
        values, lengths = torch.as_tensor(obj["features"]), torch.as_tensor(obj["lengths"]).long()
        if values.dim() < 2 or lengths.shape != values.shape[:1]:
            raise ValueError(f"{what}: 'features' must be (N, N_max, ...) and 'lengths' (N,); got "
                             f"{tuple(values.shape)} and {tuple(lengths.shape)}")
        if len(lengths) and (lengths.min() < 0 or lengths.max() > values.shape[1]):
            raise ValueError(f"{what}: lengths must lie in 0..{values.shape[1]}")
        return Padded(values.float(), lengths)
    raise ValueError(f"{what}: expected a list of (n_i, D) tensors, a dict with 'features' (N, N_max, D) and "
                     "'lengths' (N,), or an (N, D) tensor")


def split_pair(pair: str, flag: str) -> tuple[Optional[str], Path]:
    """``NAME=FILE`` -> (NAME, FILE); a bare ``FILE`` -> (None, FILE)."""
    name, sep, path = str(pair).partition("=")
    if not sep:
        return None, Path(pair)
    if not name.strip() or not path.strip():
        raise ValueError(f"{flag} wants NAME=FILE (e.g. {flag} text_features=prompts.pt), got {pair!r}")
    return name.strip(), Path(path.strip())


def payload_files(pairs: Optional[list[str]], text_features: Optional[Path] = None) -> dict[str, Path]:
    """``--payload NAME=FILE`` strings (and ``--text-features FILE``) -> {NAME: FILE}, each
    name once."""
    out: dict[str, Path] = {}
    given = [("text_features", Path(text_features))] if text_features is not None else []
    for pair in pairs or []:
        name, path = split_pair(pair, "--payload")
        if name is None:
            raise ValueError(f"--payload wants NAME=FILE (e.g. --payload text_features=prompts.pt), got {pair!r}")
        given.append((name, path))
    for name, path in given:
        if name in out:
            raise ValueError(f"the payload '{name}' is given twice (--payload {name}=... / --text-features)")
        out[name] = path
    return out


def read_payloads(files: dict[str, Path]) -> dict[str, Padded]:
    """{NAME: FILE} -> {NAME: Padded}; every payload must have as many samples."""
    from sar_core.checkpoint_io import load_file

    out = {k: padded_features(load_file(p, what=f"payload '{k}'"), f"payload '{k}' ({p})") for k, p in files.items()}
    sizes = {k: len(v.lengths) for k, v in out.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError("condition payloads have different numbers of samples: "
                         + ", ".join(f"{k} {n}" for k, n in sorted(sizes.items())))
    return out


def null_payload_files(pairs: Optional[list[str]]) -> dict[str, Path]:
    """``--null-payload NAME=FILE`` / ``--null-payload FILE`` strings -> {NAME: FILE} (a bare
    FILE is read for the names of its dict)."""
    from sar_core.checkpoint_io import load_file

    out: dict[str, Path] = {}
    for pair in pairs or []:
        name, path = split_pair(pair, "--null-payload")
        if name is not None:
            out[name] = path
            continue
        obj = load_file(path, what="null payloads")
        if not isinstance(obj, dict) or not obj:
            raise ValueError(f"--null-payload {path}: a bare FILE must hold a dict name -> (n, D) tensor; "
                             "for one tensor write --null-payload NAME=FILE")
        out.update({str(k): path for k in obj})
    return out


def read_null_payloads(files: dict[str, Path | str]) -> dict[str, torch.Tensor]:
    """{NAME: FILE} -> {NAME: (n, D) tensor}; FILE holds the tensor or a dict with NAME."""
    from sar_core.checkpoint_io import load_file

    out = {}
    for name, path in files.items():
        obj = load_file(path, what=f"null payload '{name}'")
        if isinstance(obj, dict):
            if name not in obj:
                have = ", ".join(sorted(map(str, obj))) or "nothing"
                raise ValueError(f"null payload file {path} has no '{name}' (it holds {have})")
            obj = obj[name]
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"null payload '{name}' in {path} must be an (n, D) tensor")
        out[name] = obj
    return out


def dataset_payloads(dataset) -> dict[str, torch.Tensor]:
    """The condition payloads of the dataset's first item (name -> (n_i, ...) tensor)."""
    if len(dataset) == 0:
        return {}
    item = dataset[0]
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return {}
    return split_target(item[1])[1]


def dataset_null_payloads(dataset) -> dict[str, torch.Tensor]:
    """The encoder-derived null payloads a dataset offers (its ``null_payloads`` attribute), or {}."""
    got = getattr(dataset, "null_payloads", None)
    return dict(got) if got else {}


DATA_HINT = ("the dataset's payload columns must be the family's (textimages: DIR/payloads/<name>/; "
             "choose with --set data.options.payloads=[a,b])")


def check_dataset_payloads(adapter, dataset, where: str) -> None:
    """Before training / diagnosing: the payloads of the dataset's first item against what
    ``adapter`` reads (``condition_payloads``); one-line ValueError naming the payload."""
    adapter.check_payloads(dataset_payloads(dataset), where, DATA_HINT)


def provide_null_payloads(adapter, dataset, given: bool) -> list[str]:
    """Make sure ``adapter`` has every encoder-derived null payload it declares: those
    ``given`` already (``model.null_payloads`` / ``--null-payload``), else the dataset's own
    (:func:`dataset_null_payloads`). Returns the names taken from the dataset; raises the
    adapter's one-line ValueError for one still missing."""
    needed = [k for k, s in adapter.condition_payloads.items() if s.encoded_null]
    taken: list[str] = []
    if needed and not given:
        offered = {k: v for k, v in dataset_null_payloads(dataset).items() if k in needed}
        if offered:
            adapter.set_null_payloads(offered)
            taken = sorted(offered)
    for name in needed:
        adapter.null_payload(name)
    return taken
