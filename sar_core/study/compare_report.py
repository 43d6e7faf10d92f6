"""What ``sar compare`` writes: ``compare.json`` (every number), ``compare.md`` (the table,
the per-scale exposure gap, the pictures) and the rows the console prints (the same words
in both: :func:`table`)."""

from __future__ import annotations

import json
from pathlib import Path

from sar_core.checkpoint_io import atomic_write_text
from sar_core.study.plan import HIGHER_IS_BETTER, PER_IMAGE, SAMPLED
from sar_core.study.report import LABELS, verdict_text
from sar_core.study.report import num as _num


def num(v, signed: bool = False) -> str:
    """Three significant digits: the noise is rarely known better than that."""
    return _num(v, signed, digits=3)
from sar_core.study.stats import ONE_VALUE, UNDEFINED

RULE = ("verdict only where the 95% interval of the paired difference excludes 0 (better / worse); "
        "inconclusive: it holds 0; undefined: no interval (fewer than 2 values or zero spread)")


def _label(k: str) -> str:
    return f"{LABELS.get(k, k)} {'↑' if HIGHER_IS_BETTER[k] else '↓'}"


def _value(v: dict | None) -> str:
    if v is None:
        return "-"
    return f"{num(v['value'])} ± {num(v['noise'])}" if v.get("noise") is not None else num(v["value"])


def metric_keys(result: dict) -> list[str]:
    have = set(result["models"][0]["values"])
    return [k for k in (*SAMPLED, *PER_IMAGE) if k in have]


def diff_cells(d: dict | None, unit: str) -> list[str]:
    """[difference, 95% interval, noise, verdict] of one paired difference."""
    if d is None:
        return ["-", "-", "-", "-"]
    if d["low"] is None:
        why = f"1 {unit.rstrip('s')}" if d.get("undefined") == ONE_VALUE else f"zero spread over {d['n']} {unit}"
        return [num(d["mean"], True), f"none ({why})", num(d["noise"]), UNDEFINED]
    return [num(d["mean"], True), f"[{num(d['low'], True)}, {num(d['high'], True)}]", num(d["noise"]), d["verdict"]]


def table(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the main table: per metric the value ± noise of every model, then
    per other model the paired difference, its 95% interval, its noise and the verdict."""
    ref, models = result["reference"], result["models"]
    header = ["metric", f"{ref} (ref)"]
    for m in models[1:]:
        name = m["name"]
        header += [name, f"{name} - ref", "95% interval", "noise", "verdict"] if len(models) == 2 else \
                  [name, f"{name} - ref", f"{name}: 95% interval", f"{name}: noise", f"{name}: verdict"]
    rows = []
    for k in metric_keys(result):
        row = [_label(k), _value(models[0]["values"].get(k))]
        unit = "sampling seeds" if k in SAMPLED else "validation images"
        for m in models[1:]:
            row += [_value(m["values"].get(k)), *diff_cells(result["differences"][m["name"]].get(k), unit)]
        rows.append(row)
    return header, rows


NOISE = ("values: mean ± noise (sampled metrics: sd over the sampling seeds; validation metrics: SE over the "
         "validation images); noise of a difference: SE of the paired mean difference (over sampling seeds, "
         "or over validation images)")


def scale_table(result: dict, name: str) -> tuple[list[str], list[list[str]]]:
    """Per scale: both models' exposure gap (CE) and the paired difference (and of the TF CE)."""
    header = ["scale", "size", "gap CE ref", f"gap CE {name}", "difference", "95% interval", "verdict",
              "TF CE difference [95% interval]: verdict"]
    rows = [[str(r["scale"]), "x".join(map(str, r["size"])), num(r["reference"]["gap_ce"]), num(r["model"]["gap_ce"]),
             *[c for i, c in enumerate(diff_cells(r["gap_ce"], "validation images")) if i != 2],
             verdict_text(r["tf_ce"], False, "validation images")]
            for r in result["per_scale"][name]]
    return header, rows


def describe(result: dict) -> str:
    """What was measured, from the settings actually used."""
    s = result["settings"]
    seeds = s["sampling_seeds"]
    cond = ("class labels, class-major" if s["conditions"] == "class labels"
            else "the captions of the validation images, in order")
    return (f"Every model was sampled {s['samples']} times under each of {len(seeds)} sampling seeds {seeds} "
            f"(conditions: {cond}; cfg {s['cfg']}, top-k {s['top_k']}, top-p {s['top_p']}), the same conditions "
            f"and seeds for every model; sampled metrics ({', '.join(s['metrics'])}, {s['feature_extractor']} "
            f"features) against {s['reference_images']}. Exposure gap and val TF loss on {s['val_images']} "
            f"validation images of {s['data']} (split {s['split']}), the same images for every model. "
            f"Differences are paired: over sampling seeds (sampled metrics) or over validation images "
            f"(the others); noise is the standard error of the paired mean difference. {RULE.capitalize()}.")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(result: dict) -> str:
    names = [m["name"] for m in result["models"]]
    lines = [f"# sar compare: {', '.join(names[1:])} against {names[0]}", ""]
    lines += ["Models:", ""] + [f"- `{m['name']}`: {m['family']} backbone `{m['backbone']}` (from `{m['source']}`)"
                                + (f", overrides {m['overrides']}" if m["overrides"] else "")
                                for m in result["models"]] + [""]
    lines += [describe(result), ""]
    lines += _md_table(*table(result)) + ["", NOISE.capitalize() + ".", ""]
    for name in names[1:]:
        lines += [f"## per-scale exposure gap: {name} - {names[0]}", ""] + _md_table(*scale_table(result, name)) + [""]
    pics = result.get("pictures", {})
    if pics.get("grids"):
        lines += ["## samples (same labels and sampling seed in every block)", "", f"![samples]({pics['grids']})", ""]
    if pics.get("maps"):
        lines += ["## difference maps: P(argmax on own input != argmax on ground-truth input) per token", "",
                  f"![difference maps]({pics['maps']})", ""]
    lines += [f"Wall time: {result.get('wall_s', '?')} s.", ""]
    return "\n".join(lines)


def write_compare(result: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result, indent=2), out / "compare.json")
    atomic_write_text(markdown(result), out / "compare.md")
