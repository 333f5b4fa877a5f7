"""Plugin discovery: every connector, PEFT method, decoding strategy, metric and command is a plugin module.

vlcap's own plugin modules (``BUILTIN_PLUGINS``) are registered directly, as simonw's ``llm``
does with its default plugins, so a source checkout works without ``pip install`` (``PYTHONPATH=.
python -m vlcap``, ``hw3_2.sh``). They go through the same hooks as everyone else's and are
listed as package ``vlcap``. Third-party packages come through the ``vlcap`` entry-point group.
Nothing here knows a connector, method, strategy or metric by name.

Controls (environment, read when the registry loads):

- ``VLCAP_LOAD_PLUGINS=pkg-a,pkg-b`` loads only those packages' plugins (distribution names, as
  ``pip`` knows them); set but empty, no third-party plugin at all. vlcap's own always load.
- A plugin that raises while importing or registering is skipped with a one-line warning naming
  its package; ``VLCAP_STRICT_PLUGINS=1`` (``vlcap --strict-plugins``) makes that an error.
- ``VLCAP_TRACE_PLUGINS=1`` (``vlcap --trace-plugins``) logs every hook call to stderr, through
  pluggy's hook-call monitoring.
"""
import contextlib
import dataclasses
import difflib
import functools
import importlib
import os
import re
import sys
import typing
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import click
import pluggy

import vlcap
from vlcap.core import hookspecs
from vlcap.core.errors import VlcapError, VlcapWarning
from vlcap.core.validation import bounds_of, hints

ENTRY_POINT_GROUP = "vlcap"
BUILTIN_PACKAGE = "vlcap"
# vlcap's own plugin modules, by the name they are listed under (``list-plugins --hooks``).
BUILTIN_PLUGINS = {
    "cross_attention": "vlcap.plugins.connector_cross_attention",
    "visual_tokens": "vlcap.plugins.connector_visual_tokens",
    "none": "vlcap.plugins.peft_none",
    "lora": "vlcap.plugins.peft_lora",
    "adapter": "vlcap.plugins.peft_adapter",
    "prefix": "vlcap.plugins.peft_prefix",
    "decoding": "vlcap.plugins.decoding",
    "metrics": "vlcap.plugins.metrics",
}

# kind -> (hook that registers it, what users call it in messages)
KINDS = {
    "connector": ("register_connectors", "connector"),
    "peft": ("register_peft_methods", "PEFT method"),
    "decoding": ("register_decoding_strategies", "decoding strategy"),
    "metric": ("register_metrics", "metric"),
    "command": ("register_commands", "command"),  # the hook gets a click group, not a register callback
}


@dataclass(frozen=True)
class PluginOption:
    """One option a plugin takes (a field of its ``config_class``): what ``--set NAME=VALUE`` or
    ``peft.options.NAME`` sets. ``type`` is the field's annotation as text; ``default`` is None
    when ``required``."""
    name: str
    type: str
    default: object
    required: bool = False

    def as_dict(self):
        return {"name": self.name, "type": self.type, "default": self.default, "required": self.required}


def type_name(annotation):
    """A field annotation as users read it: ``int``, ``Optional[int]``, ``Union[str, list]``,
    ``int >= 1, <= 256`` (the range of an ``Annotated`` type)."""
    if typing.get_origin(annotation) is typing.Annotated:
        bounds = bounds_of(annotation.__metadata__)
        return ", ".join([type_name(typing.get_args(annotation)[0]), *bounds]).replace(", ", " ", 1)
    if isinstance(annotation, type):
        return annotation.__name__
    return re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", str(annotation).replace("typing.", ""))


def plugin_options(obj):
    """The options of a plugin object, from the fields of its ``config_class`` (a dataclass);
    empty for a plugin without one (``config_class`` None or absent, as for metrics)."""
    config_class = getattr(obj, "config_class", None)
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return ()
    options = []
    types = hints(config_class)
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            options.append(PluginOption(f.name, type_name(types[f.name]), f.default))
        elif f.default_factory is not dataclasses.MISSING:
            options.append(PluginOption(f.name, type_name(types[f.name]), f.default_factory()))
        else:
            options.append(PluginOption(f.name, type_name(types[f.name]), None, required=True))
    return tuple(options)


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

    def options(self):
        """The ``PluginOption``s this plugin takes, in its config class's order."""
        return plugin_options(self.obj)


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


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin module comes from: its name (the entry point's), the module path, the
    package that provides it and that package's version."""
    name: str
    module: str
    package: str
    version: str

    def load(self):
        return importlib.import_module(self.module)


def builtin_sources():
    return [PluginSource(name, module, BUILTIN_PACKAGE, vlcap.__version__) for name, module in BUILTIN_PLUGINS.items()]


def entry_point_sources():
    """The third-party plugin modules to load: every ``vlcap`` entry point, or only those of the
    packages named in ``VLCAP_LOAD_PLUGINS``. (An installed vlcap declares none of its own.)"""
    eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP)
           if ep.dist is None or canonical(ep.dist.name) != BUILTIN_PACKAGE]
    wanted = os.environ.get("VLCAP_LOAD_PLUGINS")
    if wanted is not None:
        wanted = {canonical(n) for n in wanted.split(",") if n.strip()}
        installed = {canonical(ep.dist.name) for ep in eps if ep.dist}
        unknown = sorted(wanted - installed - {BUILTIN_PACKAGE})
        if unknown:
            warnings.warn(f"VLCAP_LOAD_PLUGINS names {', '.join(unknown)}, which provide(s) no vlcap plugin; "
                          f"installed plugin packages: {', '.join(sorted(installed)) or 'none'}", VlcapWarning,
                          stacklevel=2)
        eps = [ep for ep in eps if ep.dist is None or canonical(ep.dist.name) in wanted]
    return [PluginSource(ep.name, ep.value, *((ep.dist.name, ep.dist.version) if ep.dist else ("?", "")))
            for ep in eps]


def check_name_clashes(sources):
    # pluggy names plugins by entry point and refuses a second one with the same name, so two
    # packages both declaring e.g. "lora" would lose one.
    providers = {}
    for source in sources:
        providers.setdefault(source.name, [])
        if source.package not in providers[source.name]:
            providers[source.name].append(source.package)
    for name, packages in providers.items():
        if len(packages) > 1:
            raise VlcapError(f"plugin entry point '{name}' is declared by package '{packages[0]}' and by package "
                             f"'{packages[1]}'; uninstall one of them")


# id(registered object) -> (kind, package, version): who provided a plugin object, for the
# message when its code fails at run time (filled as plugins register; the registry keeps the
# objects alive).
PROVIDERS = {}


@contextlib.contextmanager
def plugin_call(obj, action):
    """Run plugin code (``action``: what it was asked to do, e.g. ``apply``): any exception but a
    ``VlcapError`` becomes one ``VlcapError`` line naming the plugin and its package, as a
    failure while loading does."""
    try:
        yield
    except VlcapError:
        raise
    except Exception as exc:
        kind, package, version = PROVIDERS.get(id(obj), (None, "?", ""))
        label = KINDS[kind][1] if kind else "plugin"
        detail = (str(exc).strip().splitlines() or [""])[0][:300]
        raise VlcapError(f"{label} '{getattr(obj, 'name', type(obj).__name__)}' of package '{package}' {version} "
                         f"failed in {action}: {type(exc).__name__}: {detail}; this is a fault of that plugin "
                         "(vlcap --trace-plugins logs its hook calls)") from exc


def warn_unknown_hooks(pm, plugin, source):
    """A hook implementation whose name no vlcap hook has is never called: warn, naming the closest."""
    known = [name for name in dir(hookspecs) if getattr(getattr(hookspecs, name), "vlcap_spec", None)]
    for caller in pm.get_hookcallers(plugin) or ():
        if caller.spec is None:
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            warnings.warn(f"plugin '{source.name}' of package '{source.package}' implements '{caller.name}', which is "
                          f"not a vlcap hook, so it is never called; {hint}hooks: {', '.join(sorted(known))}",
                          VlcapWarning, stacklevel=3)


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
    sources = builtin_sources() + sorted(entry_point_sources(), key=lambda source: source.name)
    check_name_clashes(sources)
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    packages = {}  # entry point -> "package version", for the trace
    if trace:
        trace_hook_calls(pm, packages, lambda line: print(line, file=sys.stderr))
    modules = []
    for source in sources:
        name, package, version = source.name, source.package, source.version
        packages[name] = f"{package} {version}"
        try:
            plugin = source.load()
            pm.register(plugin, name=name)
        except Exception as exc:  # a broken third-party plugin must not look like a vlcap crash
            message = f"plugin '{name}' of package '{package}' {version} failed to load: {type(exc).__name__}: {exc}"
            skip_or_raise(message, strict, exc)
            modules.append(PluginModule(name, source.module, package, version, error=f"{type(exc).__name__}: {exc}"))
            continue
        warn_unknown_hooks(pm, plugin, source)
        hooks = tuple(sorted(h.name for h in pm.get_hookcallers(plugin)))
        modules.append(PluginModule(name, source.module, package, version, hooks))
    return pm, modules


def load_registry(strict=None, trace=None):
    """Ask every loaded plugin to register what it provides; remember which package gave what.
    A plugin whose hook raises is skipped whole (nothing it registered is kept)."""
    pm, modules = load_plugins(strict, trace)
    entries = {}
    for index, module in enumerate(modules):
        if module.error:
            continue
        try:
            own = registered_by(pm, module)
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


def registered_by(pm, module):
    """``{(kind, name): PluginEntry}`` of what ``module``'s hooks register. Its hooks are called
    one plugin at a time, through pluggy (so hook-call monitoring sees each call): that is what
    attributes every registered object to its package."""
    plugin = pm.get_plugin(module.entry_point)
    others = [p for p in pm.get_plugins() if p is not plugin]
    own = {}
    for kind, (hook_name, label) in KINDS.items():
        if hook_name not in module.hooks:
            continue

        def register(obj, kind=kind, label=label):
            name = getattr(obj, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginFailure(f"registered a {label} without a name")
            description = getattr(obj, "description", "") or getattr(obj, "help", "") or (obj.__doc__ or "")
            description = description.strip()
            own[(kind, name)] = PluginEntry(name, kind, module.package, module.version,
                                            description.splitlines()[0] if description else "", obj)
            PROVIDERS[id(obj)] = (kind, module.package, module.version)

        hook = pm.subset_hook_caller(hook_name, remove_plugins=others)
        if kind == "command":
            cli = click.Group("vlcap")  # collects the plugin's commands; the CLI adds them to its own
            hook(cli=cli)
            for command in cli.commands.values():
                register(command)
        else:
            hook(register=register)
    return own


@functools.lru_cache(maxsize=None)
def registry(strict=None, trace=None):
    """The process-wide registry, loaded on first use (``strict``/``trace``: None reads the
    environment)."""
    return load_registry(strict, trace)
