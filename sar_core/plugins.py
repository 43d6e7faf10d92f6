"""Plugin discovery and the registry of everything plugins provide.

Each plugin's registration hooks are called one plugin at a time: a plugin that fails to
import, raises, or registers something malformed is reported (by name) in
``Registry.errors`` and skipped; every other plugin still loads.
"""

from __future__ import annotations

import importlib.metadata as md
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
            hint = ""
            broken = [e for e in self.errors if f"'{name}'" in e or name in e.split(":")[0]]
            if broken:
                hint = " Plugin errors: " + "; ".join(broken)
            raise PluginError(f"no {kind} named '{name}' is registered (available: {known}).{hint}") from None

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


def _load_entry_points(pm: pluggy.PluginManager, errors: list[str]) -> dict[str, str]:
    """Register every entry point of the group; returns plugin name -> distribution."""
    dists: dict[str, str] = {}
    only = None
    if os.environ.get(AUTOLOAD_ENV, "").strip() not in ("", "0", "false", "False"):
        only = {n.strip() for n in os.environ.get(EXPLICIT_ENV, "").split(",") if n.strip()}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        if only is not None and ep.name not in only:
            continue
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
