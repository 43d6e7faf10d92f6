"""Tables of docs/results.md, rendered from the published reports (docs/results/<experiment>/report.json).

    python docs/results/render.py                # every experiment's table, in markdown
    python docs/results/render.py student-forcing
    python docs/results/render.py --fill docs/results.md   # rewrite every table block in place

docs/results.md holds each table between ``<!-- table: NAME -->`` and ``<!-- /table -->``;
tests/test_results_doc.py checks that every such block equals what this script renders, so
every number in the document is the one in its report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sar_core.study.plan import HIGHER_IS_BETTER
from sar_core.study.report import LABELS, num, verdict_text

HERE = Path(__file__).resolve().parent
FLAT = {True: "flat", False: "moved", None: "-"}


def experiments() -> list[str]:
    return sorted(p.parent.name for p in HERE.glob("*/report.json"))


def table(name: str) -> str:
    """One markdown table per family: every metric's noise, each arm's paired difference to
    the control with its 95% interval over seeds and verdict, and the control's own change."""
    rep = json.loads((HERE / name / "report.json").read_text())
    control = rep["study"]["control"]
    lines = []
    for label, fam in rep["families"].items():
        arms = [a for a in rep["study"]["arms"] if a != control]
        seeds = {a: len(fam["arms"][a]["seeds"]) for a in fam["arms"]}
        head = ["metric", "start", "noise sd"] + [f"{a} - {control} ({seeds.get(a, 0)} seeds)" for a in arms] + \
               [f"{control} - start ({seeds.get(control, 0)} seeds)", "control"]
        lines += [f"**{label}** ({rep['study']['families'][label]['family']})", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for k, per_arm in fam["differences"].items():
            nz = fam["noise"][k]
            sd = "-" if nz.get("sd") is None else ("SE " if nz.get("deterministic") else "") + num(nz["sd"])
            higher = HIGHER_IS_BETTER[k]
            cells = [LABELS.get(k, k) + (" ↑" if higher else " ↓"), num(fam["start"]["metrics"][k]), sd]
            cells += [verdict_text(per_arm.get(a), higher) if a in fam["arms"] else "not run yet" for a in arms]
            cells += [verdict_text(fam["control_change"].get(k), higher), FLAT[fam["control_flat"].get(k)]]
            lines.append("| " + " | ".join(cells) + " |")
        if fam.get("missing"):
            lines.append("")
            lines.append(f"Not yet evaluated: {len(fam['missing'])} runs ({', '.join(fam['missing'])}).")
        lines.append("")
    lines += maps(name, rep)
    return "\n".join(lines).rstrip() + "\n"


def maps(name: str, rep: dict) -> list[str]:
    """The difference maps in the layout of the paper's Figure 8: one row per family, the
    start model then every arm (seed 0), each map P(argmax on own input != on ground truth)
    per token and scale."""
    arms = list(rep["study"]["arms"])
    head = ["family", "start", *arms]
    lines = ["Difference maps (per scale, P(argmax on the model's own input != argmax on ground truth), "
             "start model and the first seed of every arm):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fam in rep["families"].items():
        cells = [label]
        for who in ["start", *arms]:
            src = fam["start"] if who == "start" else fam["arms"].get(who, {})
            path = src.get("maps")
            picture = HERE / name / "pictures" / path if path else None
            cells.append(f"![{label} {who}](results/{name}/pictures/{path})" if picture and picture.is_file() else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def blocks(text: str) -> dict[str, str]:
    """The ``<!-- table: NAME -->`` blocks of a document: name -> content."""
    out, lines, name = {}, [], None
    for line in text.splitlines(keepends=True):
        if line.startswith("<!-- table: "):
            name, lines = line.split("<!-- table: ")[1].split(" -->")[0], []
        elif line.startswith("<!-- /table -->") and name:
            out[name] = "".join(lines).strip("\n") + "\n"
            name = None
        elif name:
            lines.append(line)
    return out


def fill(path: Path) -> None:
    """Rewrite every ``<!-- table: NAME -->`` block of ``path`` from its report."""
    import re

    text = path.read_text()
    for name in experiments():
        text = re.sub(rf"<!-- table: {re.escape(name)} -->\n.*?<!-- /table -->",
                      lambda m: f"<!-- table: {name} -->\n{table(name)}<!-- /table -->", text, flags=re.S)
    path.write_text(text)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fill"]:
        fill(Path(sys.argv[2]))
        sys.exit(0)
    for exp in sys.argv[1:] or experiments():
        print(f"<!-- table: {exp} -->\n{table(exp)}<!-- /table -->\n")
