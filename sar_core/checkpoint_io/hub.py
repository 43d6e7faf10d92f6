"""Checkpoints on the Hugging Face Hub: ``hf://OWNER/REPO/FILE[@REVISION]``.

One resolver for every reader (:func:`sar_core.checkpoint_io.load_file` calls it): a
reference is turned into a local file through ``huggingface_hub.hf_hub_download`` (the
optional extra ``sar[hub]``), so its cache (``HF_HOME`` / ``HF_HUB_CACHE``) and offline
mode (``HF_HUB_OFFLINE=1``: only what the cache holds) are honoured. ``FILE`` may name a
sub-folder (``vae/model.pth``); ``REVISION`` is a branch, tag or commit (default ``main``).

A run records what it used: :func:`pin` turns a reference into the same reference at the
commit it resolved to (``hf://OWNER/REPO/FILE@<40-hex commit>``), which then resolves to
the same file whatever the branch does later (and offline, from the cache alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional

from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

from sar_core import CheckpointError

SCHEME = "hf://"
FORMAT = "hf://OWNER/REPO/FILE[@REVISION]"


def is_hub_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(SCHEME)


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    filename: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return f"{SCHEME}{self.repo_id}/{self.filename}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Resolved:
    ref: HubRef
    path: Path        # the file in the local hub cache
    commit: str       # the commit it came from

    @property
    def pinned(self) -> str:
        return str(HubRef(self.ref.repo_id, self.ref.filename, self.commit))


def parse(ref: str) -> HubRef:
    """``hf://OWNER/REPO/FILE[@REVISION]`` -> HubRef; CheckpointError naming the format."""
    body = ref[len(SCHEME):] if ref.startswith(SCHEME) else ref
    path, at, revision = body.rpartition("@") if "@" in body else (body, "", "")
    parts = path.split("/")
    if len(parts) < 3 or not all(parts) or (at and not revision):
        raise CheckpointError(f"{ref!r} is not a Hub checkpoint reference; write {FORMAT}, "
                              "e.g. hf://FoundationVision/var/var_d16.pth")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


def _commit_of(path: Path) -> str:
    """The commit folder of a file in the hub cache (``.../snapshots/<commit>/FILE``)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    raise CheckpointError(f"{path}: not a file of the Hugging Face cache (no snapshots/<commit> folder)")


def resolve(ref: str) -> Resolved:
    """Find (offline: in the cache) or download the referenced file."""
    hub = parse(ref)
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub import utils as errors  # the error classes, since 0.23 (also huggingface_hub.errors)
    except ImportError:
        raise CheckpointError(f"{ref}: hf:// checkpoints need the huggingface_hub package: "
                              "pip install 'sar[hub]'") from None
    try:
        local = Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision))
    except errors.LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointError(
            f"{ref}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {where}: fetch it once with "
            f"network access (huggingface-cli download {hub.repo_id} {hub.filename}"
            f"{' --revision ' + hub.revision if hub.revision else ''}), or point HF_HOME at the cache "
            "that holds it") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{ref}: the repository {hub.repo_id} has no revision {hub.revision!r}") from None
    except errors.EntryNotFoundError:
        raise CheckpointError(f"{ref}: the repository {hub.repo_id} has no file {hub.filename!r}"
                              f"{' at ' + hub.revision if hub.revision else ''}") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{ref}: no repository {hub.repo_id} on the Hub (or it is private: log in "
                              "with huggingface-cli login or set HF_TOKEN)") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{ref}: cannot fetch it from the Hub: {msg}") from None
    return Resolved(hub, local, _commit_of(local))


def local_path(ref: Any) -> Any:
    """A local file for ``ref``: hub references resolved, anything else returned as it is."""
    return resolve(ref).path if is_hub_ref(ref) else ref


def pin(ref: Any) -> Any:
    """A hub reference at the commit it resolves to now (one already at a commit is kept
    without a look-up); anything else as it is."""
    if not is_hub_ref(ref):
        return ref
    rev = parse(ref).revision
    if rev and len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return ref
    return resolve(ref).pinned


def record(ref: Any) -> Optional[dict]:
    """What a run config records of a hub reference: pinned reference, commit and local file."""
    if not is_hub_ref(ref):
        return None
    r = resolve(ref)
    return {"ref": r.pinned, "commit": r.commit, "path": str(r.path)}


def _ref_or_path(value: Any) -> Any:
    if value is None or is_hub_ref(value):
        return value
    if isinstance(value, (str, Path)):
        return Path(value)
    raise ValueError(f"expected a file path or {FORMAT}, got {type(value).__name__}")


#: a config field holding a checkpoint: a local ``Path`` or an ``hf://`` reference (``str``)
CheckpointRef = Annotated[Any, PlainValidator(_ref_or_path), PlainSerializer(str, return_type=str, when_used="json"),
                          WithJsonSchema({"type": "string"})]
