"""``sar study report DIR``: aggregate a study folder into report.md / report.html / report.json.

Per family and metric: the value of every arm (mean ± sd over training seeds), the paired
difference arm - control with its 95% t-interval over seeds and one verdict word (better /
worse only where the interval excludes 0, inconclusive, undefined: no interval),
the metric's own measurement noise (the start model under different sampling seeds), how
far the control arm moved from the start model (flat: within two noise sd; for the
deterministic val-set metrics the noise is their standard error over the val images), per-scale
exposure-gap curves, training-loss curves, sample grids with the same labels and seeds
side by side and the per-scale difference maps. Title and prose are generated from the
resolved study (families, arms, seeds, steps, samples); the study file's own description
is only quoted. It states what was measured, whichever way it went; nothing is tuned on
the outcome.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from statistics import mean, stdev
from typing import Optional

from sar_core.checkpoint_io import atomic_write_text
from sar_core.study.plan import FIXED, HIGHER_IS_BETTER, SAMPLED, RunSpec, plan, read_study
from sar_core.study.config import START, merge
from sar_core.train.config import LossConfig, RolloutConfig, TrainConfig, default_lr
from sar_core.study.stats import ONE_VALUE, UNDEFINED, interval, is_flat, noise, paired_difference, verdict

LABELS = {"fid": "FID", "kid_mean": "KID", "precision": "precision", "recall": "recall", "f_score": "F-score",
          "isc_mean": "IS",
          "class_acc": "class accuracy", "gap_mean": "mean exposure gap (CE)", "val_loss_tf": "val TF loss",
          "gap_acc": "mean exposure gap (accuracy)"}


# ----------------------------------------------------------------------------- aggregation
def _read(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _history(folder: Path) -> list[dict]:
    p = folder / "metrics.jsonl"
    if not p.is_file():
        return []
    rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return [{k: r.get(k) for k in ("step", "loss_tf", "loss_csf")} for r in rows]


def _curve(runs: list[dict], key: str) -> dict:
    cols = list(zip(*[r[key] for r in runs]))
    return {"mean": [mean(c) for c in cols], "sd": [stdev(c) if len(c) > 1 else 0.0 for c in cols]}


def aggregate_family(study, out: Path, label: str) -> dict:
    start = _read(out / label / START / "eval.json")
    if start is None:
        raise FileNotFoundError(f"{out / label / START / 'eval.json'} is missing: run `sar study FILE --out {out} "
                                "--arm start` (or the whole study) first")
    metrics = [k for k in HIGHER_IS_BETTER if k in start["metrics"]]
    noise_seeds = [str(s) for s in study.eval.noise_seeds]
    fam = {"start": {"metrics": start["metrics"], "gap": start["gap"], "grid": start.get("grid"),
                     "maps": start.get("maps"), "map_means": start.get("map_means"),
                     "num_images": start.get("standard_error", {}).get("num_images"),
                     "samples": start.get("samples"), "conditions": start.get("conditions", "class labels")},
           "noise": {}, "arms": {}, "differences": {}, "control_change": {}, "control_flat": {}, "missing": []}
    for k in metrics:
        if k in SAMPLED:
            fam["noise"][k] = noise([start["per_sampling_seed"][s][k] for s in noise_seeds])
        else:  # deterministic given the val set: its noise is the standard error over val images
            se = start.get("standard_error", {})
            sd, n_img = se.get(k), se.get("num_images", 0)
            m = start["metrics"][k]
            fam["noise"][k] = {"n": n_img, "mean": m, "sd": sd, "relative": sd / abs(m) if sd and m else None,
                               "diff_sd": None if sd is None else sd * 2 ** 0.5, "deterministic": True}
    for arm in study.arms:
        runs = {}
        for spec in plan(study, label, arm):
            res = _read(spec.folder(out) / "eval.json")
            if res is None:
                fam["missing"].append(str(spec.folder(out).relative_to(out)))
            else:
                runs[spec.seed] = res
        if not runs:
            continue
        first = runs[min(runs, key=study.seeds.index)]
        vals = list(runs.values())
        fam["arms"][arm] = {
            "seeds": sorted(runs), "steps": sorted({r.get("steps") for r in vals if r.get("steps") is not None}),
            "runs": {str(s): r["metrics"] for s, r in runs.items()},
            "summary": {k: interval([r["metrics"][k] for r in vals]) for k in metrics},
            "gap": _curve(vals, "gap"), "grid": first.get("grid"), "maps": first.get("maps"),
            "map_means": first.get("map_means"),
            "history": _history(RunSpec(label, arm, first["seed"]).folder(out)),
        }
    control = fam["arms"].get(study.control)
    for k in metrics:
        if control is None:
            break
        ctl = {s: v[k] for s, v in control["runs"].items()}
        fam["differences"][k] = {a: paired_difference({s: v[k] for s, v in arm["runs"].items()}, ctl)
                                 for a, arm in fam["arms"].items() if a != study.control}
        change = interval([v - start["metrics"][k] for v in ctl.values()])
        fam["control_change"][k] = change
        fam["control_flat"][k] = is_flat(change, fam["noise"][k]["sd"])
    return fam


def aggregate(out: str | Path, study=None) -> dict:
    """Every family of ``study`` (default: the folder's own study.yaml) from the runs in ``out``."""
    out = Path(out)
    study = study or read_study(out)
    return {"study": study.to_dict(), "families": {f: aggregate_family(study, out, f) for f in study.families}}


# ----------------------------------------------------------------------------- plots
FONT = 11  # points at 100 dpi: readable at the PNG's own size


def _figure(w: float, h: float):
    from sar_core.evaluate.pictures import figure

    return figure(w, h, dpi=100)


def _plots(results: dict, out: Path) -> dict:
    """Per family: exposure-gap curves + training losses, and one interval panel per metric
    (``plots/<family>_diff_<metric>.png``: every arm's paired difference with its interval,
    the ±2 noise sd band, and the words of the table)."""
    plots = {}
    control = results["study"]["control"]
    for label, fam in results["families"].items():
        fig = _figure(13, 4.6)
        ax1, ax2 = fig.subplots(1, 2)
        g = fam["start"]["gap"]
        ax1.plot(range(1, len(g) + 1), g, "k:", label="start model")
        for arm, a in fam["arms"].items():
            ax1.errorbar(range(1, len(a["gap"]["mean"]) + 1), a["gap"]["mean"], yerr=a["gap"]["sd"], marker="o",
                         capsize=3, label=arm)
            h = [r for r in a["history"] if r.get("loss_tf") is not None]
            ax2.plot([r["step"] for r in h], [r["loss_tf"] for r in h], label=f"{arm}: L_TF")
            if any(r.get("loss_csf") for r in h):
                ax2.plot([r["step"] for r in h], [r["loss_csf"] for r in h], "--", label=f"{arm}: L_CSF")
        ax1.axhline(0, color="grey", lw=0.5)
        ax1.set_xticks(range(1, len(g) + 1))
        ax1.set_xlabel("scale index (input from own prediction one scale below)", fontsize=FONT)
        ax1.set_ylabel("CE own - CE gt", fontsize=FONT)
        ax1.set_title(f"{label}: per-scale exposure gap (mean ± sd over seeds)", fontsize=FONT + 1)
        ax2.set_xlabel("optimizer step (first seed)", fontsize=FONT)
        ax2.set_ylabel("loss", fontsize=FONT)
        ax2.set_title("training losses", fontsize=FONT + 1)
        for ax in (ax1, ax2):
            ax.tick_params(labelsize=FONT - 1)
            ax.legend(fontsize=FONT - 2)
        fig.tight_layout()
        path = out / "plots" / f"{label}_gap_and_losses.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plots[f"{label}/gap"] = path
        for k, per_arm in fam["differences"].items():
            arms = [a for a, d in per_arm.items() if d]
            if not arms:
                continue
            fig = _figure(7.5, 1.5 + 0.55 * len(arms))
            ax = fig.subplots()
            for y, a in enumerate(arms):
                d = per_arm[a]
                if d["low"] is not None:
                    ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o",
                                capsize=4, color="tab:blue")
                else:
                    ax.plot([d["mean"]], [y], "x", color="grey")
                ax.annotate(verdict_text(d, HIGHER_IS_BETTER[k], "seeds"), (0.99, y), xycoords=("axes fraction", "data"),
                            ha="right", va="bottom", fontsize=FONT - 2)
            sd = fam["noise"][k]["sd"]
            if sd:
                ax.axvspan(-2 * sd, 2 * sd, color="tab:orange", alpha=0.2, label="±2 noise sd")
                ax.legend(fontsize=FONT - 2, loc="lower left")
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(arms)))
            ax.set_yticklabels(arms, fontsize=FONT)
            ax.set_ylim(-0.6, len(arms) - 0.2)
            ax.tick_params(axis="x", labelsize=FONT - 1)
            ax.set_title(f"{label}: {LABELS.get(k, k)}, arm - {control} (95% interval over seeds)", fontsize=FONT)
            fig.tight_layout()
            path = out / "plots" / f"{label}_diff_{k}.png"
            fig.savefig(path)
            plots[f"{label}/diff/{k}"] = path
    return plots


# ----------------------------------------------------------------------------- text
def num(v: Optional[float], signed: bool = False, digits: int = 4) -> str:
    if v is None:
        return "-"
    return f"{v:+.{digits}g}" if signed else f"{v:.{digits}g}"


def verdict_text(d: Optional[dict], higher: bool, unit: str = "seeds") -> str:
    """``+0.034 [+0.023, +0.045]: worse`` / ``...: inconclusive`` / ``+0.015: undefined
    (zero spread over 2 seeds)``: the same words in the console, markdown and HTML."""
    if d is None:
        return "-"
    word = verdict(d, higher)
    if word == UNDEFINED:
        why = f"1 {unit.rstrip('s')}" if d.get("undefined") == ONE_VALUE else f"zero spread over {d['n']} {unit}"
        return f"{num(d['mean'], True)}: undefined ({why})"
    return f"{num(d['mean'], True)} [{num(d['low'], True)}, {num(d['high'], True)}]: {word}"


def _arm_settings(study: dict, arm: str) -> str:
    tree = merge(study.get("run", {}), study["arms"][arm])
    ro, loss, tr, opt = (tree.get(k, {}) or {} for k in ("rollout", "loss", "train", "optim"))
    d_ro, d_loss, d_tr = (c.model_fields for c in (RolloutConfig, LossConfig, TrainConfig))  # sar train's defaults
    name = ro.get("name", d_ro["name"].default)
    batch = tr.get("batch_size", d_tr["batch_size"].default)
    what = "teacher forcing only" if name in ("none", None) else (
        f"rollout {name}" + (f" ({ro['scales']} scales)" if ro.get("scales") else "")
        + (f" depth {ro['depth']}" if ro.get("depth", 1) != 1 else "")
        + f", CSF loss {loss.get('name', d_loss['name'].default)}, gamma {loss.get('gamma', d_loss['gamma'].default)}")
    return (f"`{arm}`: {what}; {tr.get('steps', d_tr['steps'].default)} steps at batch {batch}, "
            f"lr {opt.get('lr', float(f'{default_lr(batch):.3g}'))}")


def study_header(results: dict, out: Path) -> list:
    """Title and prose generated from the resolved study (its own description only quoted)."""
    study = results["study"]
    fams = results["families"]
    e = study["eval"]
    labels = ", ".join(f"`{f}` ({study['families'][f]['family']})" for f in fams)
    blocks = [("h1", f"sar study `{study['name']}`: {', '.join(study['arms'])} on {len(fams)} "
                     f"famil{'y' if len(fams) == 1 else 'ies'}, {len(study['seeds'])} training seeds")]
    blocks.append(("p", f"Families: {labels}. Every arm of a family starts from the same checkpoint; training "
                        f"seeds {study['seeds']}, paired across arms. Arms (control `{study['control']}`): "
                        + "; ".join(_arm_settings(study, a) for a in study["arms"]) + "."))
    blocks.append(("p", f"Every run is evaluated under sampling seeds {e['sampling_seeds']} "
                        f"(class-conditional families: {e['samples_per_class']} samples per class; families without "
                        "classes: one sample per validation caption), the metric noise from the start model under "
                        f"sampling seeds {e['noise_seeds']}, features: {e['feature_extractor']}. Reproduce: "
                        f"`sar study {out}/study.yaml --out DIR`; one run per job: `--arm NAME --seed S`, then "
                        "`sar study report DIR`."))
    if study.get("description"):
        blocks.append(("quote", "The study file's own description (not checked against what ran): "
                                + " ".join(study["description"].split())))
    return blocks


def family_blocks(label: str, fam: dict, study: dict, plots: dict, out: Path) -> list:
    control = study["control"]
    arms = list(fam["arms"])
    metrics = list(fam["noise"])
    rows = []
    for k in metrics:
        rows.append([LABELS.get(k, k) + (" ↑" if HIGHER_IS_BETTER[k] else " ↓"), num(fam["start"]["metrics"][k])]
                    + [f"{num(fam['arms'][a]['summary'][k]['mean'])} ± {num(fam['arms'][a]['summary'][k]['sd'])}"
                       for a in arms])
    st = fam["start"]
    ran = "; ".join(f"`{a}`: seeds {fam['arms'][a]['seeds']}"
                    + (f", {'/'.join(map(str, fam['arms'][a]['steps']))} steps" if fam["arms"][a].get("steps") else "")
                    for a in arms) or "none yet"
    cond = ("conditioned on validation captions" if st.get("conditions") == "validation captions"
            else "class-balanced")
    blocks = [("h2", f"family `{label}` ({study['families'][label]['family']})"),
              ("p", f"Runs evaluated: {ran}. Each evaluated under sampling seeds {study['eval']['sampling_seeds']} "
                    f"with {st.get('samples') or '?'} samples per seed ({cond}); exposure gap and val TF loss on "
                    f"{st.get('num_images') or '?'} validation images. Values: mean ± sd over the runs' training seeds."),
              ("table", ["metric", "start"] + arms, rows)]
    others = [a for a in arms if a != control]
    if fam["differences"]:
        rows = [[LABELS.get(k, k)] + [verdict_text(fam["differences"][k].get(a), HIGHER_IS_BETTER[k]) for a in others]
                for k in metrics]
        blocks += [("h3", f"paired difference arm - {control} (95% t-interval over training seeds; better / worse "
                          "only where it excludes 0)"),
                   ("table", ["metric"] + others, rows)]
    rows = []
    for k in metrics:
        nz, ch = fam["noise"][k], fam["control_change"].get(k)
        flat = fam["control_flat"].get(k)
        rows.append([LABELS.get(k, k),
                     ("SE " if nz.get("deterministic") else "")
                     + f"{num(nz['sd'])} ({num(100 * nz['relative'] if nz['relative'] is not None else None)}% of mean)",
                     verdict_text(ch, HIGHER_IS_BETTER[k]) if ch else "-",
                     {True: "flat (within 2 noise sd)", False: "moved (beyond 2 noise sd)", None: "-"}[flat]])
    fid_note = ""
    nz = fam["noise"].get("fid")
    if nz and nz["sd"]:
        five = 0.05 * nz["mean"]
        fid_note = (f" FID noise: sd {nz['sd']:.4g} = {100 * nz['relative']:.1f}% of its mean with "
                    f"{st.get('samples') or '?'} samples, so a 5% FID difference ({five:.4g}) "
                    f"is {five / nz['sd']:.2f} noise sd ({'above' if five > nz['sd'] else 'BELOW'} the noise) "
                    f"and {five / nz['diff_sd']:.2f} sd of the difference of two unpaired evaluations.")
    blocks += [("h3", "measurement noise and the control arm"),
               ("p", f"Noise: sd of the start model's metric over sampling seeds {study['eval']['noise_seeds']}; "
                     "for the metrics computed on the fixed validation set (val TF loss, exposure gap) the "
                     "standard error (SE) over its images instead. "
                     f"Control change: {control} - start per training seed; flat when its mean lies within "
                     "2 noise sd." + fid_note),
               ("table", ["metric", "noise sd", f"{control} - start", "control"], rows)]
    pics = [(f"{label}/gap", "exposure gap and training losses")]
    pics += [(f"{label}/diff/{k}", f"paired differences: {LABELS.get(k, k)}") for k in metrics]
    blocks += [("img", [(cap, str(plots[key])) for key, cap in pics if key in plots])]
    grids = [("start", st["grid"])] + [(a, fam["arms"][a]["grid"]) for a in arms]
    blocks += [("h3", "samples (same conditions and sampling seed in every grid; "
                      + ("column titles: the class" if cond == "class-balanced" else "cell titles: the caption") + ")"),
               ("img", [(c, p) for c, p in grids if p])]
    maps = [("start", st.get("maps"))] + [(a, fam["arms"][a].get("maps")) for a in arms]
    if any(p for _, p in maps):
        blocks += [("h3", "difference maps: P(argmax on own input != argmax on ground-truth input) per token"),
                   ("img", [(c, p) for c, p in maps if p])]
    if fam["missing"]:
        blocks += [("p", "NOT YET EVALUATED (left out above): " + ", ".join(fam["missing"]))]
    return blocks


def _md(blocks: list) -> str:
    lines = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "quote":
            lines += ["> " + b[1], ""]
        elif b[0] == "table":
            lines += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
        elif b[0] == "img" and b[1]:
            lines += [f"**{c}**\n\n![{c}]({p})\n" for c, p in b[1]]
    return "\n".join(lines)


def _html(blocks: list, title: str) -> str:
    """Every picture at its own pixel size (never shrunk; the page scrolls sideways instead)."""
    e = html.escape
    parts = [f"<!doctype html><meta charset='utf-8'><title>{e(title)}</title><style>body{{font-family:sans-serif;"
             "margin:1em 2em}p,h1,h2,h3,table{max-width:1100px}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 7px}blockquote{color:#555;border-left:3px solid #ccc;"
             "padding-left:8px}figure{display:inline-block;margin:4px;vertical-align:top}"
             "img{max-width:none}</style>"]
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            parts.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "quote":
            parts.append(f"<blockquote>{e(b[1])}</blockquote>")
        elif b[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in b[1]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2]) + "</table>")
        elif b[0] == "img":
            parts.append("<div>" + "".join(f"<figure><img src='{e(p)}' alt='{e(c)}'><figcaption>{e(c)}</figcaption>"
                                           "</figure>" for c, p in b[1]) + "</div>")
    return "\n".join(parts)


def _relink(blocks: list, out: Path, dest: Path, copy: bool) -> list:
    """Pictures of the run folders (paths relative to ``out``) as links from ``dest``: a
    relative path, or (``copy``) a copy under ``dest/pictures/`` so the report stands alone."""
    import os
    import shutil

    def link(p: str) -> str:
        if (dest / p).is_file():  # written for this report (plots/)
            return p
        if not copy:
            return os.path.relpath(out / p, dest)
        target = dest / "pictures" / p
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / p, target)
        return str(Path("pictures") / p)

    def kept(pics: list) -> list:  # a picture the folder does not hold (an archive keeps no grids) is left out
        return [(c, p) for c, p in pics if (dest / p).is_file() or (out / p).is_file()]

    blocks = [("img", kept(b[1])) if b[0] == "img" else b for b in blocks]
    blocks = [b for b in blocks if b[0] != "img" or b[1]]
    if dest == out and not copy:
        return blocks
    return [("img", [(c, link(p)) for c, p in b[1]]) if b[0] == "img" else b for b in blocks]


def write_report(out: str | Path, experiment: Optional[str] = None, dest: Optional[str | Path] = None,
                 copy_pictures: bool = False, grids: bool = True) -> dict:
    """Aggregate ``out`` and write report.md / report.html / report.json / plots into
    ``dest`` (default: ``out``; for an ``experiment``: ``out/experiments/<name>``); returns
    the aggregated results (what report.json holds). ``copy_pictures`` copies the sample
    grids and maps beside the report (a folder that can be published without the runs);
    ``grids=False`` leaves the sample grids out of it."""
    out = Path(out)
    study = read_study(out)
    if experiment is not None:
        study = study.experiment(experiment)
    dest = Path(dest) if dest is not None else (out / "experiments" / experiment if experiment else out)
    dest.mkdir(parents=True, exist_ok=True)
    results = aggregate(out, study)
    plots = {k: p.relative_to(dest) for k, p in _plots(results, dest).items()}
    study_dict = results["study"]
    blocks = study_header(results, out)
    for label, fam in results["families"].items():
        blocks += family_blocks(label, fam, study_dict, plots, out)
    if not grids:  # a lighter published copy: the sample grids stay in the study folder
        blocks = [("p", "Sample grids (same conditions and sampling seed in every arm): not published with this "
                        "report; they are in the study folder, `<family>/<arm>/seed<S>/grid.png`.")
                  if b[0] == "h3" and b[1].startswith("samples") else b for b in blocks
                  if not (b[0] == "img" and b[1] and all(p.endswith("grid.png") for _, p in b[1]))]
    blocks = _relink(blocks, out, dest, copy_pictures)
    atomic_write_text(_md(blocks) + "\n", dest / "report.md")
    atomic_write_text(_html(blocks, blocks[0][1]), dest / "report.html")
    atomic_write_text(json.dumps(results, indent=2), dest / "report.json")
    return results


def write_reports(out: str | Path) -> dict:
    """The whole study's report and, when it has experiments, each experiment's own."""
    results = write_report(out)
    for name in results["study"].get("experiments") or {}:
        write_report(out, name)
    return results
