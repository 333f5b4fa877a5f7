"""Plugin discovery: every PEFT method, decoding strategy and metric comes from an entry point.

The built-in plugins are declared in vlcap's own ``setup.cfg`` under the ``vlcap`` entry-point
group and loaded exactly like a third-party package's, so nothing here imports a plugin by name.

Controls (environment, read when the registry loads):

- ``VLCAP_LOAD_PLUGINS=pkg-a,pkg-b`` loads only those packages' plugins (distribution names, as
  ``pip`` knows them); set but empty, no third-party plugin at all. vlcap's own always load.
- A plugin that raises while importing or registering is skipped with a one-line warning naming
  its package; ``VLCAP_STRICT_PLUGINS=1`` (``vlcap --strict-plugins``) makes that an error.
- ``VLCAP_TRACE_PLUGINS=1`` (``vlcap --trace-plugins``) logs every hook call to stderr, through
  pluggy's hook-call monitoring.
"""
import functools
import os
import re
import sys
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from vlcap.core import hookspecs
from vlcap.core.errors import VlcapError, VlcapWarning

ENTRY_POINT_GROUP = "vlcap"
BUILTIN_PACKAGE = "vlcap"

# kind -> (hook that registers it, what users call it in messages)
KINDS = {
    "peft": ("register_peft_methods", "PEFT method"),
    "decoding": ("register_decoding_strategies", "decoding strategy"),
    "metric": ("register_metrics", "metric"),
}


@dataclass(frozen=True)
class PluginEntry:
    name: str
    kind: str
    package: str
    version: str
    description: str
    obj: object

    def as_dict(self):
        return {k: getattr(self, k) for k in ("name", "kind", "package", "version", "description")}


@dataclass(frozen=True)
class PluginModule:
    """One entry point: the module it loads, the package that declared it, the hooks it implements
    and, if it was skipped, why."""
    entry_point: str
    module: str
    package: str
    version: str
    hooks: tuple = ()
    error: str = ""

    def as_dict(self):
        return {k: getattr(self, k) for k in ("entry_point", "module", "package", "version", "hooks", "error")}


class Registry:
    def __init__(self, entries, modules=()):
        self._entries = {(e.kind, e.name): e for e in entries}
        self.modules = list(modules)

    def entries(self, kind=None):
        return sorted((e for e in self._entries.values() if kind in (None, e.kind)),
                      key=lambda e: (e.kind, e.name))

    def names(self, kind):
        return [e.name for e in self.entries(kind)]

    def get(self, kind, name):
        try:
            return self._entries[(kind, name)].obj
        except KeyError:
            installed = ", ".join(self.names(kind)) or "none"
            raise VlcapError(f"unknown {KINDS[kind][1]} '{name}'; installed: {installed}") from None

    def entry(self, kind, name):
        self.get(kind, name)
        return self._entries[(kind, name)]

    def failed(self):
        """The entry points that were skipped because they raised."""
        return [m for m in self.modules if m.error]


def canonical(dist_name):
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def selected_entry_points():
    """The ``vlcap`` entry points to load: all of them, or vlcap's own plus the packages named in
    ``VLCAP_LOAD_PLUGINS``."""
    eps = list(entry_points(group=ENTRY_POINT_GROUP))
    wanted = os.environ.get("VLCAP_LOAD_PLUGINS")
    if wanted is None:
        return eps
    wanted = {canonical(n) for n in wanted.split(",") if n.strip()}
    installed = {canonical(ep.dist.name) for ep in eps if ep.dist}
    unknown = sorted(wanted - installed)
    if unknown:
        warnings.warn(f"VLCAP_LOAD_PLUGINS names {', '.join(unknown)}, which provide(s) no vlcap plugin; "
                      f"installed plugin packages: {', '.join(sorted(installed))}", VlcapWarning, stacklevel=2)
    return [ep for ep in eps if ep.dist is None or canonical(ep.dist.name) in wanted | {BUILTIN_PACKAGE}]


def _check_entry_point_clashes(eps):
    # pluggy names plugins by entry point and refuses a second one with the same name, so two
    # packages both declaring e.g. "lora" would lose one.
    providers = {}
    for ep in eps:
        dist = ep.dist.name if ep.dist else "?"
        providers.setdefault(ep.name, [])
        if dist not in providers[ep.name]:
            providers[ep.name].append(dist)
    for name, dists in providers.items():
        if len(dists) > 1:
            raise VlcapError(f"plugin entry point '{name}' is declared by package '{dists[0]}' and by package "
                             f"'{dists[1]}'; uninstall one of them")


class PluginFailure(Exception):
    """A plugin raised while importing or registering; carries the one-line message."""


def skip_or_raise(message, strict, exc):
    if strict:
        raise VlcapError(f"{message}; fix or uninstall it (or drop --strict-plugins / VLCAP_STRICT_PLUGINS)") from exc
    warnings.warn(f"{message}; skipped it (fix or uninstall it; VLCAP_LOAD_PLUGINS chooses which load)",
                  VlcapWarning, stacklevel=3)


def trace_hook_calls(pm, packages, write):
    """Log every hook call: which plugin (and package) it went to, and how it ended."""
    def before(hook_name, impls, kwargs):
        names = ", ".join(f"{pm.get_name(impl.plugin)} ({packages.get(pm.get_name(impl.plugin), '?')})"
                          for impl in impls)
        write(f"vlcap plugins: calling {hook_name} on {names}")

    def after(outcome, hook_name, impls, kwargs):
        error = outcome.exception
        write(f"vlcap plugins: {hook_name} " + (f"raised {type(error).__name__}: {error}" if error else "returned"))

    return pm.add_hookcall_monitoring(before, after)


def load_plugins(strict=None, trace=None):
    """A plugin manager with every selected entry point loaded, and a ``PluginModule`` per entry
    point (failures included)."""
    strict = env_flag("VLCAP_STRICT_PLUGINS") if strict is None else strict
    trace = env_flag("VLCAP_TRACE_PLUGINS") if trace is None else trace
    eps = selected_entry_points()
    _check_entry_point_clashes(eps)
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    packages = {}  # entry point -> "package version", for the trace
    if trace:
        trace_hook_calls(pm, packages, lambda line: print(line, file=sys.stderr))
    modules = []
    for ep in sorted(eps, key=lambda ep: (ep.dist is None or ep.dist.name != BUILTIN_PACKAGE, ep.name)):
        package, version = (ep.dist.name, ep.dist.version) if ep.dist else ("?", "")
        packages[ep.name] = f"{package} {version}"
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not look like a vlcap crash
            message = f"plugin '{ep.name}' of package '{package}' {version} failed to load: {type(exc).__name__}: {exc}"
            skip_or_raise(message, strict, exc)
            modules.append(PluginModule(ep.name, ep.value, package, version, error=f"{type(exc).__name__}: {exc}"))
            continue
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin)))
        modules.append(PluginModule(ep.name, ep.value, package, version, hooks))
    return pm, modules


def load_registry(strict=None, trace=None):
    """Ask every loaded plugin to register what it provides; remember which package gave what.
    A plugin whose hook raises is skipped whole (nothing it registered is kept)."""
    pm, modules = load_plugins(strict, trace)
    entries = {}
    for index, module in enumerate(modules):
        if module.error:
            continue
        plugin = pm.get_plugin(module.entry_point)
        others = [p for p in pm.get_plugins() if p is not plugin]
        own = {}
        try:
            for kind, (hook_name, label) in KINDS.items():
                if hook_name not in module.hooks:
                    continue

                def register(obj, kind=kind, label=label):
                    name = getattr(obj, "name", None)
                    if not isinstance(name, str) or not name:
                        raise PluginFailure(f"registered a {label} without a name")
                    description = getattr(obj, "description", "") or (obj.__doc__ or "").strip()
                    own[(kind, name)] = PluginEntry(name, kind, module.package, module.version,
                                                    description.splitlines()[0] if description else "", obj)

                # One plugin at a time, through pluggy (so hook-call monitoring sees each call):
                # that is what lets us attribute every registered object to its package.
                pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
        except Exception as exc:
            message = (f"plugin '{module.entry_point}' of package '{module.package}' {module.version} failed to "
                       f"register: {type(exc).__name__}: {exc}")
            skip_or_raise(message, strict, exc)
            modules[index] = PluginModule(module.entry_point, module.module, module.package, module.version,
                                          module.hooks, f"{type(exc).__name__}: {exc}")
            continue
        for key, entry in own.items():
            if key in entries:
                label = KINDS[entry.kind][1]
                raise VlcapError(f"{label} '{entry.name}' is registered twice: by package '{entries[key].package}' "
                                 f"and by package '{entry.package}'; uninstall one of them")
            entries[key] = entry
    return Registry(entries.values(), modules)


@functools.lru_cache(maxsize=None)
def registry(strict=None, trace=None):
    """The process-wide registry, loaded on first use (``strict``/``trace``: None reads the
    environment)."""
    return load_registry(strict, trace)
