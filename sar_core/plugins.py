"""Plugin discovery and the registry of everything plugins provide.

Each plugin's registration hooks are called one plugin at a time: a plugin that fails to
import, raises, or registers something malformed is reported (by name) in
``Registry.errors`` and skipped; every other plugin still loads.

A plugin module may also declare the names it registers, ``SAR_NAMES = {"adapter": ["var"]}``
(a literal): :func:`declared_names` reads them from the module's source without importing it
(shell completion must not import torch). The registry stays the source of truth: once it
is built in a process, :func:`known_names` answers from it.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from sar_core import hookspecs

ENTRY_POINT_GROUP = "sar"
AUTOLOAD_ENV = "SAR_DISABLE_PLUGIN_AUTOLOAD"
EXPLICIT_ENV = "SAR_PLUGINS"

#: registration hook name -> kind used in the registry
KINDS = {
    "register_adapters": "adapter",
    "register_rollouts": "rollout",
    "register_losses": "loss",
    "register_schedules": "schedule",
    "register_datasets": "dataset",
    "register_metrics": "metric",
    "register_loggers": "logger",
}


class PluginError(RuntimeError):
    """Raised when a requested registry entry does not exist or its plugin failed."""


@dataclass
class Entry:
    kind: str
    name: str
    obj: Any
    plugin: str
    package: str


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS.values()})
    errors: list[str] = field(default_factory=list)
    pm: Optional[pluggy.PluginManager] = None

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name].obj
        except KeyError:
            known = ", ".join(sorted(self.entries.get(kind, {}))) or "none"
            hint = did_you_mean(name, self.entries.get(kind, {}))
            broken_hint = ""
            broken = [e for e in self.errors if f"'{name}'" in e or name in e.split(":")[0]]
            if broken:
                broken_hint = ". Plugin errors: " + "; ".join(broken)
            raise PluginError(f"no {kind} named '{name}' is registered{hint} (available: {known})"
                              f"{broken_hint}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def rows(self) -> list[dict]:
        return [{"kind": e.kind, "name": e.name, "plugin": e.plugin, "package": e.package,
                 "object": f"{getattr(e.obj, '__module__', '?')}.{getattr(e.obj, '__qualname__', type(e.obj).__name__)}"}
                for kind in self.entries.values() for e in kind.values()]

    @property
    def hook(self):
        return self.pm.hook


def _validate(kind: str, name: str, obj: Any) -> Optional[str]:
    if not isinstance(name, str) or not name or not name.replace("-", "_").replace(".", "_").isidentifier():
        return f"invalid {kind} name {name!r} (use letters, digits, '-', '_')"
    if kind == "adapter":
        from sar_core.adapter import ScaleWiseAdapter

        if not (isinstance(obj, type) and issubclass(obj, ScaleWiseAdapter)):
            return f"adapter '{name}' is {obj!r}, not a ScaleWiseAdapter subclass"
        missing = sorted(getattr(obj, "__abstractmethods__", ()))
        if missing:
            return f"adapter '{name}' ({obj.__qualname__}) does not implement: {', '.join(missing)}"
        from sar_core.schedule import ATTENTION_PATTERNS

        if obj.attention not in ATTENTION_PATTERNS:
            return (f"adapter '{name}' declares attention {obj.attention!r}; the contract supports "
                    f"{', '.join(ATTENTION_PATTERNS)}")
        if obj.attention == "within-scale" and obj.reuses_prefix:
            return f"adapter '{name}' attends within each scale, so it has no prefix to reuse: set reuses_prefix False"
    elif not callable(obj):
        return f"{kind} '{name}' is {obj!r}, which is not callable"
    return None


def did_you_mean(name: str, choices) -> str:
    """``": did you mean 'x'?"`` for the closest of ``choices`` to a mistyped ``name`` (or "")."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=2, cutoff=0.6)
    return ": did you mean " + " or ".join(f"'{c}'" for c in close) + "?" if close else ""


def _enabled_entry_points() -> list:
    """The ``sar`` entry points to load (``SAR_DISABLE_PLUGIN_AUTOLOAD`` / ``SAR_PLUGINS``)."""
    only = None
    if os.environ.get(AUTOLOAD_ENV, "").strip() not in ("", "0", "false", "False"):
        only = {n.strip() for n in os.environ.get(EXPLICIT_ENV, "").split(",") if n.strip()}
    return [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if only is None or ep.name in only]


NAMES_ATTRIBUTE = "SAR_NAMES"


def read_declared_names(path: str | os.PathLike) -> dict[str, list[str]]:
    """The ``SAR_NAMES`` literal of a plugin module's source file ({} when it has none)."""
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        if any(isinstance(t, ast.Name) and t.id == NAMES_ATTRIBUTE for t in targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            if not isinstance(value, dict):
                return {}
            return {str(k): [str(n) for n in v] for k, v in value.items() if isinstance(v, (list, tuple))}
    return {}


def declared_names(kind: str) -> list[str]:
    """Names of ``kind`` (adapter, rollout, loss, dataset, ...) that the enabled plugins declare
    in ``SAR_NAMES``, read from their source files: no plugin is imported (only the parent
    packages of a plugin module, to locate it)."""
    names: set[str] = set()
    for ep in _enabled_entry_points():
        try:
            spec = importlib.util.find_spec(ep.module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not str(spec.origin).endswith(".py"):
            continue
        names.update(read_declared_names(spec.origin).get(kind, ()))
    return sorted(names)


def known_names(kind: str) -> list[str]:
    """The registry's names of ``kind`` once it is built in this process, else the declared ones."""
    if _REGISTRY is not None:
        return _REGISTRY.names(kind)
    return declared_names(kind)


def undeclared(reg: "Registry") -> list[str]:
    """One line per plugin whose registered names differ from its ``SAR_NAMES`` (the shell
    completes the declared ones before the registry is built)."""
    out = []
    for name, plugin in reg.pm.list_name_plugin() if reg.pm is not None else ():
        declared = getattr(plugin, NAMES_ATTRIBUTE, None)
        if not isinstance(declared, dict):
            declared = {}
        for kind, entries in reg.entries.items():
            registered = {e.name for e in entries.values() if e.plugin == name}
            said = set(declared.get(kind, ()))
            if registered != said:
                out.append(f"plugin '{name}' registers {kind} names {sorted(registered)} but declares "
                           f"{sorted(said)} in {NAMES_ATTRIBUTE} (shell completion uses the declared ones)")
    return out


def _load_entry_points(pm: pluggy.PluginManager, errors: list[str]) -> dict[str, str]:
    """Register every entry point of the group; returns plugin name -> distribution."""
    dists: dict[str, str] = {}
    for ep in _enabled_entry_points():
        if pm.has_plugin(ep.name):
            continue
        dist = ep.dist.name if getattr(ep, "dist", None) is not None else "?"
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not break the others
            errors.append(f"plugin '{ep.name}' (package {dist}) failed to load: {type(exc).__name__}: {exc}")
            continue
        dists[ep.name] = dist
    return dists


def build_registry(extra_plugins: tuple = (), autoload: bool = True) -> Registry:
    """Discover plugins, call their registration hooks one by one, return the registry.

    ``extra_plugins`` are objects registered in addition (tests, embedding apps).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    reg = Registry(pm=pm)
    dists = _load_entry_points(pm, reg.errors) if autoload else {}
    for i, plugin in enumerate(extra_plugins):
        try:
            pm.register(plugin, name=getattr(plugin, "__name__", None) or f"extra-{i}")
        except Exception as exc:
            reg.errors.append(f"plugin {plugin!r} failed to register: {exc}")
    for hook_name, kind in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
            package = dists.get(plugin_name, "(not installed)")
            _call_registration(reg, kind, impl.function, plugin_name, package)
    return reg


def _call_registration(reg: Registry, kind: str, fn: Callable, plugin: str, package: str) -> None:
    staged: list[Entry] = []

    def register(name: str, obj: Any) -> None:
        problem = _validate(kind, name, obj)
        if problem:
            raise PluginError(problem)
        staged.append(Entry(kind, name, obj, plugin, package))

    try:
        fn(register=register)
    except Exception as exc:
        reg.errors.append(f"plugin '{plugin}' (package {package}) failed in {KINDS_R[kind]}: "
                          f"{type(exc).__name__}: {exc}")
        return
    for e in staged:
        prev = reg.entries[kind].get(e.name)
        if prev is not None:
            reg.errors.append(f"plugin '{plugin}' registers {kind} '{e.name}' already provided by "
                              f"plugin '{prev.plugin}'; keeping the first")
            continue
        reg.entries[kind][e.name] = e


KINDS_R = {v: k for k, v in KINDS.items()}

_REGISTRY: Optional[Registry] = None


def get_registry(refresh: bool = False) -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None or refresh:
        _REGISTRY = build_registry()
    return _REGISTRY
