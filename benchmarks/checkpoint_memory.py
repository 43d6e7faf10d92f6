"""Peak RSS of loading and of saving a VAR-d16-sized checkpoint (issue 22, item 1).

    .venv/bin/python benchmarks/checkpoint_memory.py            # part of `make bench`
    .venv/bin/python benchmarks/checkpoint_memory.py --python /other/venv/bin/python  # another checkout

A random VAR-d16 tokenizer + backbone pair (the released sizes: depth 16, width 1024,
vocabulary 4096, VQVAE ch 160; ~1.7 GB of fp32 weights) is written once into a temporary
folder. Each measurement then runs in a fresh subprocess, so nothing of one leaks into the
next, and reads the kernel's resident-set peak (``VmHWM`` in ``/proc/self/status``, reset
through ``/proc/self/clear_refs`` where the kernel allows it, else the process' whole
peak):

* **load**: ``VARAdapter.load(tokenizer, backbone)`` then a read of every weight (a
  memory-mapped file costs nothing until it is touched, so untouched weights would
  flatter it); peak above the RSS before the load.
* **save**: a loaded model whose every weight has been written to (as after training:
  anonymous memory, no longer the file's pages), then ``adapter.save(tokenizer, backbone)``;
  peak above the RSS before the load (model + what saving adds) and above the RSS just
  before the save (what saving adds).

The bound (issue 22): each peak <= 1.2 x the weights' bytes + ``BASE_MIB``. Exit status 1
when a bound fails. ``--json FILE`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_MIB = 256  # allocator arenas, module objects, the zip writer's buffers, one transient tensor
RATIO = 1.2
D16 = dict(depth=16, embed_dim=1024, num_heads=16, vocab_size=4096, Cvae=32, ch=160, num_classes=1000,
           patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), drop_path_rate=0.0)

CHILD = r"""
import json, os, sys, time
import torch

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False

from sar_core.plugins import get_registry
cls = get_registry().get("adapter", "var")
mode, tok, bb, out = sys.argv[1:5]
torch.set_num_threads(1)
resettable = reset_peak()
before = status("VmRSS")
t0 = time.perf_counter()
adapter = cls.load(tok, bb)
tensors = [t for m in (adapter.tokenizer, adapter.backbone) for t in (*m.parameters(), *m.buffers())]
weights = sum(t.numel() * t.element_size() for t in tensors)
with torch.no_grad():
    checksum = sum(float(t.double().sum()) if t.is_floating_point() else float(t.sum()) for t in tensors)
load_s = time.perf_counter() - t0
res = {"weights": weights, "rss_before": before, "resettable": resettable, "load_s": load_s,
       "checksum": checksum}
if mode == "load":
    res["peak"] = status("VmHWM") - before
else:
    with torch.no_grad():
        for t in tensors:
            if t.is_floating_point():
                t.mul_(1.0)
    pre_save = status("VmRSS")
    reset_peak()
    t0 = time.perf_counter()
    adapter.save(os.path.join(out, "tok.pth"), os.path.join(out, "bb.pth"))
    res["save_s"] = time.perf_counter() - t0
    hwm = status("VmHWM")
    res["peak"] = hwm - before
    res["save_extra"] = hwm - pre_save
print("RESULT " + json.dumps(res))
"""


def write_checkpoint(folder: Path, python: str) -> tuple[Path, Path]:
    """The random VAR-d16 pair, written by ``python`` (fp32, upstream plain layout)."""
    tok, bb = folder / "vae_d16_random.pth", folder / "var_d16_random.pth"
    code = ("import sys, torch; from sar_core.plugins import get_registry; torch.manual_seed(0); "
            f"a = get_registry().get('adapter', 'var').from_config({D16!r}); a.save(sys.argv[1], sys.argv[2])")
    subprocess.run([python, "-c", code, str(tok), str(bb)], check=True, cwd=ROOT)
    return tok, bb


def measure(mode: str, python: str, tok: Path, bb: Path, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([python, "-c", CHILD, mode, str(tok), str(bb), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{mode} measurement failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run(python: str = sys.executable, folder: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="sar-ckpt-mem-", dir=folder) as tmp:
        tmp = Path(tmp)
        tok, bb = write_checkpoint(tmp, python)
        files = tok.stat().st_size + bb.stat().st_size
        load = measure("load", python, tok, bb, tmp)
        save = measure("save", python, tok, bb, tmp)
    w = load["weights"]
    bound = RATIO * w + BASE_MIB * 2 ** 20
    return {"python": python, "weights_bytes": w, "file_bytes": files, "base_mib": BASE_MIB, "ratio": RATIO,
            "load": load, "save": save, "bound_bytes": bound,
            "ok": load["peak"] <= bound and save["peak"] <= bound}


def report(r: dict) -> str:
    mib = 2 ** 20
    w = r["weights_bytes"]
    lines = [f"VAR-d16 random checkpoint: {w / mib:.0f} MiB of weights ({r['file_bytes'] / mib:.0f} MiB in files); "
             f"bound {r['ratio']} x weights + {r['base_mib']} MiB = {r['bound_bytes'] / mib:.0f} MiB"]
    for mode in ("load", "save"):
        m = r[mode]
        extra = f", of which saving adds {m['save_extra'] / mib:.0f} MiB" if mode == "save" else ""
        secs = m["save_s"] if mode == "save" else m["load_s"]
        lines.append(f"  {mode}: peak RSS {m['peak'] / mib:.0f} MiB above the process base = "
                     f"{m['peak'] / w:.2f} x weights{extra} ({secs:.1f} s)")
    if not r["load"]["resettable"]:
        lines.append("  (kernel refused to reset VmHWM: peaks include the import phase)")
    lines.append("  within the bound" if r["ok"] else "  BOUND EXCEEDED")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter of the checkout to measure")
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the temporary checkpoint (~1.7 GB)")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    r = run(args.python, args.tmp)
    print(report(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
