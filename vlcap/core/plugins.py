"""Plugin discovery: every PEFT method, decoding strategy and metric comes from an entry point.

The built-in plugins are declared in vlcap's own ``setup.cfg`` under the ``vlcap`` entry-point
group and loaded by ``load_setuptools_entrypoints`` exactly like a third-party package's, so
nothing here imports a plugin by name.
"""
import functools
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy

from vlcap.core import hookspecs
from vlcap.core.errors import VlcapError

ENTRY_POINT_GROUP = "vlcap"

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


class Registry:
    def __init__(self, entries):
        self._entries = {(e.kind, e.name): e for e in entries}

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


def _check_entry_point_clashes():
    # pluggy registers entry points under their name and silently skips a second one with the
    # same name, so two packages both declaring e.g. "lora" would lose one without a word.
    providers = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "?"
        providers.setdefault(ep.name, [])
        if dist not in providers[ep.name]:
            providers[ep.name].append(dist)
    for name, dists in providers.items():
        if len(dists) > 1:
            raise VlcapError(f"plugin entry point '{name}' is declared by package '{dists[0]}' and by package "
                             f"'{dists[1]}'; uninstall one of them")


def _plugin_manager():
    _check_entry_point_clashes()
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken third-party plugin must not look like a vlcap crash
        raise VlcapError(f"a vlcap plugin failed to load: {type(exc).__name__}: {exc}; "
                         "reinstall or uninstall that plugin package") from exc
    return pm


def load_registry(pm=None):
    """Ask every loaded plugin to register what it provides; remember which package gave what."""
    pm = pm or _plugin_manager()
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    entries = {}
    for kind, (hook_name, label) in KINDS.items():
        # Calling each implementation ourselves (instead of the combined hook) is what lets us
        # attribute every registered object to the package that registered it.
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            dist = dists.get(id(impl.plugin))
            package = dist.project_name if dist else pm.get_name(impl.plugin)
            version = dist.version if dist else ""

            def register(obj, kind=kind, label=label, package=package, version=version):
                name = getattr(obj, "name", None)
                if not isinstance(name, str) or not name:
                    raise VlcapError(f"package '{package}' registered a {label} without a name")
                if (kind, name) in entries:
                    other = entries[(kind, name)].package
                    raise VlcapError(f"{label} '{name}' is registered twice: by package '{other}' "
                                     f"and by package '{package}'; uninstall one of them")
                description = getattr(obj, "description", "") or (obj.__doc__ or "").strip()
                entries[(kind, name)] = PluginEntry(name, kind, package, version,
                                                    description.splitlines()[0] if description else "", obj)

            impl.function(register=register)
    return Registry(entries.values())


@functools.lru_cache(maxsize=None)
def registry():
    """The process-wide registry, loaded on first use."""
    return load_registry()
