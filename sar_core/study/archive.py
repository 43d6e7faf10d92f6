"""A study folder without its weights: what its reports are made of, small enough to
commit beside them (``sar study archive DIR --into DEST``).

DEST holds ``study.yaml``; each family's start evaluation (``<family>/start/eval.json``) and
difference map; and for every evaluated run its ``eval.json``, ``config.yaml`` and
``data.json``, its ``metrics.jsonl`` reduced to the columns a report reads, and the difference map the reports
show (the first seed's). Checkpoints, weights, sample grids and code caches stay behind.

DEST is a study folder: ``sar study report DEST [--experiment NAME --into D --no-grids]``
aggregates the same numbers as the original, and ``sar study FILE --out DEST`` continues the
study (an archived run counts as done; the families' caches are rebuilt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from sar_core.checkpoint_io import atomic_write_bytes, atomic_write_text
from sar_core.study.config import START
from sar_core.study.plan import plan, read_study

#: the training-log columns a study report reads (loss curves)
HISTORY = ("step", "loss_tf", "loss_csf")


def _copy(src: Path, dst: Path) -> None:
    with open(src, "rb") as fh_in:
        atomic_write_bytes(lambda fh: shutil.copyfileobj(fh_in, fh), dst)


def _picture(out: Path, dest: Path, rel) -> None:
    if rel and (out / rel).is_file():
        _copy(out / rel, dest / rel)


def _history(src: Path, dst: Path) -> None:
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    atomic_write_text("".join(json.dumps({k: r.get(k) for k in HISTORY}) + "\n" for r in rows), dst)


def archive_study(out: str | Path, dest: str | Path) -> dict:
    """Copy the record of study folder ``out`` into ``dest``; returns what was archived
    (``runs`` evaluated and copied, ``missing`` runs not yet evaluated, ``starts``)."""
    out, dest = Path(out), Path(dest)
    if out.resolve() == dest.resolve():
        raise ValueError(f"--into {dest} is the study folder itself: name another folder")
    study = read_study(out)
    dest.mkdir(parents=True, exist_ok=True)
    _copy(out / "study.yaml", dest / "study.yaml")
    starts = []
    for label in study.families:
        start = out / label / START / "eval.json"
        if start.is_file():
            _copy(start, dest / label / START / "eval.json")
            _picture(out, dest, json.loads(start.read_text()).get("maps"))
            starts.append(label)
    runs, missing, shown = [], [], set()
    for spec in sorted(plan(study), key=lambda r: study.seeds.index(r.seed)):
        src = spec.folder(out)
        rel = src.relative_to(out)
        if not (src / "eval.json").is_file():
            missing.append(str(rel))
            continue
        res = json.loads((src / "eval.json").read_text())
        _copy(src / "eval.json", dest / rel / "eval.json")
        for name in ("config.yaml", "data.json"):
            if (src / name).is_file():
                _copy(src / name, dest / rel / name)
        if (src / "metrics.jsonl").is_file():
            _history(src / "metrics.jsonl", dest / rel / "metrics.jsonl")
        if (spec.family, spec.arm) not in shown:  # the reports show the first evaluated seed's maps
            _picture(out, dest, res.get("maps"))
            shown.add((spec.family, spec.arm))
        runs.append(str(rel))
    return {"runs": runs, "missing": missing, "starts": starts}
