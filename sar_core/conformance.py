"""The adapter conformance kit: run a golden case and compare every recorded output.

A golden case is a folder (format: docs/conformance.md) with ``config.json`` naming the
``family`` and the checkpoint files, and ``case.pt`` holding inputs and, usually, the
upstream outputs. The kit loads the family's adapter from the registry, asks it to
compute every output (the family's :class:`CaseRunner`, ``adapter_cls.case_runner``), and
compares each key present in both with tolerances chosen by the value's kind:

* integer / bool tensors and int lists (indices, bits, schedules): exactly equal;
* 0-d floats (losses): ``atol 1e-5``; keys containing ``grad_norm``: ``rtol 1e-4``;
* float tensors (latents, logits, images): ``|a - b| <= 1e-4 + 1e-4 * |b|``.

Each result carries the rule that decided it (``KeyResult.note``) and ``used``, the worst
element's share of what the rule allows (pass <= 1): a relative error alone says nothing
for values near 0, where the absolute term decides.

A runner may override tolerances per key with ``tolerances = {key: (atol, rtol)}``. A case
that holds inputs only is computed and (with ``dump``) saved, nothing compared.

Golden cases live beside the training contract: a family without them sets nothing
(``case_runner = None``). The kit itself runs the runner in eval mode with condition
dropout 0 (``adapter.inference()``), in float32 (autocast off), with the global RNG seeded
0 and restored afterwards.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from sar_core.checkpoint_io import atomic_save, load_file

FLOAT_TOL = (1e-4, 1e-4)
LOSS_TOL = (1e-5, 0.0)
NORM_TOL = (0.0, 1e-4)


@dataclass
class KeyResult:
    key: str
    status: str                 # "pass" | "fail" | "computed"
    kind: str                   # "exact" | "float" | "scalar" | "-"
    max_abs: Optional[float] = None
    max_rel: Optional[float] = None
    note: str = ""              # the rule that decides, e.g. "|a-b| <= 1e-4 + 1e-4*|b|"
    used: Optional[float] = None  # max over elements of |a-b| / (atol + rtol*|b|): pass iff <= 1


@dataclass
class ConformanceReport:
    case_dir: Path
    family: str
    results: list[KeyResult] = field(default_factory=list)
    computed: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.status != "fail" for r in self.results)

    @property
    def compared(self) -> int:
        return sum(r.status in ("pass", "fail") for r in self.results)


class CaseRunner:
    """A family's golden-case support: how to load a case's model and compute its outputs.

    Subclass, then declare it on the adapter: ``case_runner = MyCaseRunner``.
    """

    #: per-key tolerance overrides, {key: (atol, rtol)}
    tolerances: ClassVar[dict] = {}

    def overrides(self, config: dict, case_dir: Optional[Path] = None) -> dict:
        """Config overrides for ``adapter_cls.load`` from a case's config.json (hyper-
        parameters that the checkpoint's tensor shapes do not hold); ``case_dir`` is the
        case folder, for sidecar files (the kit always passes it). Default: none. (A runner
        whose ``overrides`` takes ``config`` alone, as before, still works.)"""
        return {}

    def run(self, adapter, case: dict, config: dict) -> dict:
        """Every output computable from the case's inputs, {key: tensor | list | number}.
        Called through :func:`run_case` (eval mode, dropout 0, float32, seeded RNG)."""
        raise NotImplementedError


def case_runner_for(adapter_cls) -> CaseRunner:
    runner = adapter_cls.case_runner
    if runner is None:
        raise ValueError(f"family '{adapter_cls.name}' has no golden-case support: its adapter "
                         "declares no case_runner (see docs/conformance.md)")
    return runner()


def run_case(adapter, case: dict, config: dict, runner: Optional[CaseRunner] = None) -> dict:
    """Run a family's case runner with the kit's pins: eval mode and condition dropout 0
    (restored afterwards, even on error), autocast off, global RNG seeded 0 (restored)."""
    runner = runner or case_runner_for(type(adapter))
    with adapter.inference(), torch.autocast(adapter.device.type, enabled=False), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        computed = runner.run(adapter, case, config)
    return {k: _detach(v) for k, v in computed.items()}


def load_case_adapter(adapter_cls, config: dict, case_dir: Path, runner: Optional[CaseRunner] = None):
    """The adapter a case's config.json names, loaded with the runner's overrides."""
    runner = runner or case_runner_for(adapter_cls)
    files = config["files"]
    tok = case_dir / files["tokenizer"] if files.get("tokenizer") else None
    bb = case_dir / files["backbone"] if files.get("backbone") else None
    return adapter_cls.load(tok, bb, overrides=runner_overrides(runner, config, case_dir))


def runner_overrides(runner: CaseRunner, config: dict, case_dir: Path) -> dict:
    """``runner.overrides(config, case_dir)``, or ``(config)`` for a runner written before
    the case folder was passed."""
    params = [p for p in inspect.signature(runner.overrides).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    if len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params):
        return runner.overrides(config, Path(case_dir))
    return runner.overrides(config)


def read_case(case_dir: str | Path) -> tuple[dict, dict, Path]:
    """Return (config.json, case.pt dict, folder) with clear errors."""
    d = Path(case_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d} is not a golden case: {cfg_path.name} is missing")
    config = json.loads(cfg_path.read_text())
    for key in ("family", "files"):
        if key not in config:
            raise ValueError(f"{cfg_path}: required field '{key}' is missing")
    case_file = d / config["files"].get("case", "case.pt")
    case = load_file(case_file, what="golden case")
    if not isinstance(case, dict):
        raise ValueError(f"{case_file}: expected a dict of inputs and outputs")
    return config, case, d


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, (int, bool)) for v in value):
            return [torch.tensor(value)]
        if value and all(isinstance(v, (int, float)) for v in value):
            return [torch.tensor(value, dtype=torch.float64)]
        out = []
        for v in value:
            out.extend(_flatten(v))
        return out
    if isinstance(value, bool) or isinstance(value, int):
        return [torch.tensor(value)]
    if isinstance(value, float):
        return [torch.tensor(value, dtype=torch.float64)]
    raise TypeError(f"cannot compare a value of type {type(value).__name__}")


def _tolerance(key: str, kind: str, overrides: dict) -> tuple[float, float]:
    if key in overrides:
        return overrides[key]
    if kind == "scalar":
        return NORM_TOL if "grad_norm" in key else LOSS_TOL
    return FLOAT_TOL


def compare_key(key: str, got: Any, want: Any, overrides: dict | None = None) -> KeyResult:
    """Compare one computed value with the recorded one (see module docstring)."""
    try:
        g_list, w_list = _flatten(got), _flatten(want)
    except TypeError as exc:
        return KeyResult(key, "fail", "-", note=str(exc))
    if len(g_list) != len(w_list):
        return KeyResult(key, "fail", "-", note=f"{len(g_list)} tensors vs {len(w_list)} recorded")
    exact = all(not (w.is_floating_point() or w.is_complex()) for w in w_list)
    kind = "exact" if exact else ("scalar" if all(w.ndim == 0 for w in w_list) else "float")
    atol, rtol = _tolerance(key, kind, overrides or {})
    max_abs = max_rel = used = 0.0
    ok = True
    for g, w in zip(g_list, w_list):
        g = g.detach().cpu()
        if tuple(g.shape) != tuple(w.shape):
            return KeyResult(key, "fail", kind, note=f"shape {tuple(g.shape)} vs recorded {tuple(w.shape)}")
        if w.numel() == 0:
            continue
        diff = (g.double() - w.double()).abs()
        if torch.isnan(diff).any():
            return KeyResult(key, "fail", kind, note="NaN in computed or recorded value")
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, (diff / w.double().abs().clamp_min(1e-12)).max().item())
        if exact:
            ok &= bool((diff == 0).all())
        else:
            allowed = atol + rtol * w.double().abs()
            ok &= bool((diff <= allowed).all())
            share = torch.where(diff == 0, torch.zeros_like(diff), diff / allowed)   # inf where nothing is allowed
            used = max(used, share.max().item())
    if exact:
        return KeyResult(key, "pass" if ok else "fail", kind, max_abs, max_rel, "exact match required")
    return KeyResult(key, "pass" if ok else "fail", kind, max_abs, max_rel, tolerance_rule(atol, rtol), used)


def tolerance_rule(atol: float, rtol: float) -> str:
    """The element-wise rule of a float comparison, as the report prints it."""
    if rtol == 0:
        return f"|a-b| <= {atol:g}"
    if atol == 0:
        return f"|a-b| <= {rtol:g}*|b|"
    return f"|a-b| <= {atol:g} + {rtol:g}*|b|"


def run_conformance(case_dir: str | Path, registry=None, dump: str | Path | None = None) -> ConformanceReport:
    """Load the case's adapter, compute every output, compare, optionally dump."""
    from sar_core.plugins import get_registry

    config, case, d = read_case(case_dir)
    registry = registry or get_registry()
    adapter_cls = registry.get("adapter", config["family"])
    runner = case_runner_for(adapter_cls)
    adapter = load_case_adapter(adapter_cls, config, d, runner)
    computed = run_case(adapter, case, config, runner)
    report = ConformanceReport(d, config["family"], computed=computed)
    overrides = dict(runner.tolerances)
    for key in sorted(computed):
        if key in case:
            report.results.append(compare_key(key, computed[key], case[key], overrides))
        else:
            report.results.append(KeyResult(key, "computed", "-", note="not recorded in case.pt"))
    if dump is not None:
        atomic_save(computed, dump)
    return report


def _detach(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach(x) for x in v)
    if isinstance(v, dict):
        return {k: _detach(x) for k, x in v.items()}
    return v
