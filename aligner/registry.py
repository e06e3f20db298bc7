"""Find plugins, activate the ones a run asked for, and check their roles.

Plugins are found through the entry-point group ``aligner.plugins`` (the
built-ins are registered there by this project's own ``pyproject.toml``). A
name of the form ``package.module:attr`` (or ``package.module``) loads a
plugin that is not installed as a distribution.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from aligner import hookspecs
from aligner.config import DEFAULT_LOGGERS, DEFAULT_LOSS
from aligner.hookspecs import API_VERSION, REQUIRED_HOOKS, ROLES, PluginInfo

GROUP = "aligner.plugins"
__all__ = ["DEFAULT_LOGGERS", "DEFAULT_LOSS", "GROUP", "ActivePlugins", "PluginError", "PluginHookError", "activate",
           "available_plugins", "logger_names"]


class PluginError(ValueError):
    """A plugin could not be found, loaded or combined with the others."""


@dataclass
class AvailablePlugin:
    """A plugin that an entry point advertises, not yet imported."""

    name: str
    target: str  # "module" or "module:attr"
    distribution: str  # "name-version" of the package that ships it

    def load(self) -> object:
        return _import_target(self.target, self.name)


def available_plugins() -> dict[str, AvailablePlugin]:
    """Every plugin advertised in the ``aligner.plugins`` entry-point group, by name."""
    found: dict[str, AvailablePlugin] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        dist = f"{ep.dist.name}-{ep.dist.version}" if ep.dist is not None else "unknown"
        found.setdefault(ep.name, AvailablePlugin(ep.name, ep.value, dist))
    return dict(sorted(found.items()))


def _import_target(target: str, name: str) -> object:
    """Import ``module`` or ``module:attr``. Any failure (not only ImportError: a package may raise anything, or
    exit, while it is imported) is a :class:`PluginError` naming the plugin, so it fails only runs that name it."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - third-party code: whatever it raises, the plugin is broken
        why = f"{exc}" if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise PluginError(f"plugin '{name}': cannot import module '{module_name}': {why}") from exc
    for part in filter(None, attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(f"plugin '{name}': module '{module_name}' has no attribute '{attr}'") from exc
    if inspect.isclass(obj):
        raise PluginError(
            f"plugin '{name}' ({target}) is a class; register a module or an instance of it "
            f"(e.g. `my_plugin = {obj.__name__}()` and point the entry point at `my_plugin`)"
        )
    return obj


def plugin_info(plugin: object, label: str) -> PluginInfo:
    """Call a plugin's ``aligner_plugin_info`` hook and check what it returns."""
    fn = getattr(plugin, "aligner_plugin_info", None)
    if fn is None:
        raise PluginError(f"plugin '{label}' has no aligner_plugin_info hook; every plugin must say its name and role")
    info = fn()
    if not isinstance(info, PluginInfo):
        raise PluginError(f"plugin '{label}': aligner_plugin_info must return aligner.hookspecs.PluginInfo, got {info!r}")
    if info.role not in ROLES:
        raise PluginError(f"plugin '{label}' declares role '{info.role}'; the roles are {', '.join(ROLES)}")
    if info.api_version.split(".")[0] != API_VERSION.split(".")[0]:
        raise PluginError(
            f"plugin '{label}' was written for aligner plugin API {info.api_version}, this aligner has "
            f"{API_VERSION}; upgrade the plugin (or aligner) so the major versions match"
        )
    return info


def _describe(available: dict[str, AvailablePlugin]) -> str:
    rows = []
    for name, ap in available.items():
        try:
            info = plugin_info(ap.load(), name)
            rows.append(f"  {name:<12} {info.role:<17} {info.summary}")
        except PluginError as exc:
            rows.append(f"  {name:<12} (broken: {exc})")
    return "available plugins:\n" + ("\n".join(rows) if rows else "  (none installed: run `pip install -e .`)")


@dataclass
class ActivePlugins:
    """The plugins of one run, registered in a pluggy manager, with their roles."""

    pm: pluggy.PluginManager
    infos: dict[str, PluginInfo] = field(default_factory=dict)
    #: name -> where it was loaded from (the entry point's ``module[:attr]``, or the ``module:attr`` given)
    targets: dict[str, str] = field(default_factory=dict)
    #: name -> ``distribution-version`` of the package that ships it (``unknown`` when none can be found)
    versions: dict[str, str] = field(default_factory=dict)

    def names(self, role: str | None = None) -> list[str]:
        return [n for n, i in self.infos.items() if role is None or i.role == role]

    @property
    def training(self) -> list[str]:
        """Every active plugin but the loggers (what ``--plugins`` named, and the default loss): what a
        checkpoint must match on resume, what ``config.json``'s ``plugins`` lists."""
        return [n for n, i in self.infos.items() if i.role != "logger"]

    @property
    def loggers(self) -> list[str]:
        """The active loggers, in ``report_to`` order."""
        return self.names("logger")

    @property
    def losses(self) -> list[str]:
        """The active loss plugins, in ``--plugins`` order (at least one)."""
        return self.names("loss")

    @property
    def reference_update(self) -> str | None:
        names = self.names("reference_update")
        return names[0] if names else None

    def config_sections(self) -> dict[str, type]:
        """Section name -> dataclass type, from every active plugin."""
        sections: dict[str, type] = {}
        for plugin_name, section in self.call_each("aligner_config_section"):
            if section is None:
                continue
            key, cls = section
            if key in sections:
                raise PluginError(f"plugins '{plugin_name}' and another both claim the config section '{key}'")
            sections[key] = cls
        return sections

    def required_models(self, config: Any) -> set[str]:
        """The models (:data:`aligner.hookspecs.MODELS`) that some active plugin asked for."""
        return self._union("aligner_required_models", config, hookspecs.MODELS, "models", "builds")

    def required_inputs(self, config: Any) -> set[str]:
        """The optional inputs (:data:`aligner.hookspecs.INPUTS`) that some active plugin asked for."""
        return self._union("aligner_required_inputs", config, hookspecs.INPUTS, "inputs", "provides")

    def _union(self, hook_name: str, config: Any, known, what: str, verb: str) -> set[str]:
        """The union of every plugin's answer to ``hook_name``, refusing a name outside ``known``."""
        needed: set[str] = set()
        for plugin_name, asked in self.call_each(hook_name, config=config):
            unknown = set(asked or ()) - set(known)
            if unknown:
                raise PluginError(f"plugin '{plugin_name}' asked for unknown {what} {sorted(unknown)}; "
                                  f"aligner {verb} {', '.join(known)}")
            needed |= set(asked or ())
        return needed

    def call_each(self, hook_name: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call one hook on each plugin that implements it, returning (plugin name, result) pairs.

        This is the one way aligner calls a hook. Order: implementations marked ``tryfirst``
        first, then unmarked ones in the order the plugins were activated (``--plugins``
        order), then ``trylast``.
        """
        return [(impl.plugin_name, self._call(impl, hook_name, kwargs)) for impl in self._impls(hook_name)]

    def call_one(self, plugin_name: str, hook_name: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of ``hook_name``; ``None`` if it has none."""
        for impl in self._impls(hook_name):
            if impl.plugin_name == plugin_name:
                return self._call(impl, hook_name, kwargs)
        return None

    def first_result(self, hook_name: str, **kwargs: Any) -> Any:
        """For a ``firstresult`` hook: the first non-None answer, in :meth:`call_each`'s order (later ones are not called)."""
        if not getattr(self.pm.hook, hook_name).spec.opts.get("firstresult"):
            raise PluginHookError(f"{hook_name} is not a firstresult hook; call it with call_each")
        for impl in self._impls(hook_name):
            result = self._call(impl, hook_name, kwargs)
            if result is not None:
                return result
        return None

    def _impls(self, hook_name: str) -> list:
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()  # pluggy's list: trylast, plain, tryfirst
        return sorted(impls, key=lambda i: 0 if i.tryfirst else 2 if i.trylast else 1)

    def _call(self, impl, hook_name: str, kwargs: dict[str, Any]) -> Any:
        """Call by keyword with the arguments the implementation takes; a raise names the plugin and hook."""
        with hook_errors(self, hook_name):
            return impl.function(**{a: kwargs[a] for a in impl.argnames})


class PluginHookError(RuntimeError):
    """A plugin's hook raised; the message names the plugin and the hook."""


@contextmanager
def hook_errors(plugins: ActivePlugins, hook_name: str) -> Iterator[None]:
    """Re-raise an exception from inside a hook as :class:`PluginHookError` naming the plugin."""
    try:
        yield
    except PluginHookError:
        raise
    except Exception as exc:
        culprit = _plugin_in_traceback(plugins, exc) or "?"
        raise PluginHookError(
            f"plugin '{culprit}' failed in hook {hook_name}: {type(exc).__name__}: {exc}"
        ) from exc


def _plugin_in_traceback(plugins: ActivePlugins, exc: BaseException) -> str | None:
    files = {}
    for name in plugins.infos:
        plugin = plugins.pm.get_plugin(name)
        module = plugin if inspect.ismodule(plugin) else sys.modules.get(type(plugin).__module__)
        if module is not None and getattr(module, "__file__", None):
            files[module.__file__] = name
    tb = exc.__traceback__
    culprit = None
    while tb is not None:
        culprit = files.get(tb.tb_frame.f_code.co_filename, culprit)
        tb = tb.tb_next
    return culprit


def activate(names: list[str], loggers: list[str] | tuple[str, ...] = ()) -> ActivePlugins:
    """Build the plugin manager for a run from the names given with ``--plugins`` and the loggers of ``report_to``.

    Each name is an installed plugin (entry point) or a ``module:attr`` target.
    At least one loss is required (``dpo`` is added when none is named; several
    losses are summed with their weights, see :class:`aligner.hookspecs.LossConfig`),
    at most one reference update, any number of constraints; duplicates and
    unknown names are errors that list what is available. A logger belongs in
    ``loggers`` (``report_to``) and only there; every other role only in ``names``.
    """
    available = available_plugins()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    active = ActivePlugins(pm)
    seen: set[str] = set()
    for raw, as_logger in [(n, False) for n in names] + [(n, True) for n in loggers]:
        name = raw.strip()
        if not name:
            continue
        where = "report_to" if as_logger else "--plugins"
        if name in seen:
            raise PluginError(f"plugin '{name}' is listed twice in {where}; list each plugin once")
        seen.add(name)
        if name in available:
            plugin = available[name].load()
            target, version = available[name].target, available[name].distribution
        elif ":" in name or "." in name:
            plugin = _import_target(name, name)
            target, version = name, _distribution_of(name)
        else:
            what = "logger" if as_logger else "plugin"
            raise PluginError(f"unknown {what} '{name}' in {where}.\n{_describe(available)}")
        info = plugin_info(plugin, name)
        check_place(info, name, as_logger)
        if info.name in active.infos:
            raise PluginError(f"two plugins are both named '{info.name}' ({name}); list each plugin once")
        pm.register(plugin, name=info.name)
        check_hooks(pm, info, name)
        active.infos[info.name] = info
        active.targets[info.name], active.versions[info.name] = target, version

    if not active.names("loss"):
        if DEFAULT_LOSS not in available:
            raise PluginError(f"no loss plugin given and the default '{DEFAULT_LOSS}' is not installed.\n{_describe(available)}")
        return activate([DEFAULT_LOSS, *names], loggers)
    check_roles(active, available)
    pm.check_pending()
    return active


def check_place(info: PluginInfo, label: str, as_logger: bool) -> None:
    """A logger is named in ``report_to``, every other plugin in ``--plugins``: one place for each choice."""
    if as_logger and info.role != "logger":
        raise PluginError(f"report_to names '{label}', a {info.role} plugin, not a logger; name it in --plugins "
                          f"(report_to lists loggers, e.g. report_to: [tensorboard, wandb])")
    if not as_logger and info.role == "logger":
        raise PluginError(f"--plugins names '{label}', a logger; name loggers in report_to instead, e.g. "
                          f"--set report_to=[tensorboard,{label}] (the default is [{', '.join(DEFAULT_LOGGERS)}])")


def logger_names(value: Any, source: str = "report_to") -> list[str]:
    """``report_to`` as a list of logger names: a list, a comma-separated string, ``none`` (no logger) or
    missing (:data:`DEFAULT_LOGGERS`). TRL's ``all`` is refused: a run names the loggers it reports to."""
    if value is None:
        return list(DEFAULT_LOGGERS)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PluginError(f"{source}: expected a list of logger names (e.g. [tensorboard, wandb]) or none, got {value!r}")
    if value in (["none"], []):
        return []
    if "all" in value or "none" in value:
        loggers = [n for n, ap in available_plugins().items() if _role_of(ap) == "logger"]
        raise PluginError(f"{source}: {'all' if 'all' in value else 'none'} cannot be combined with other names"
                          f"{' and all is not supported' if 'all' in value else ''}; list the loggers to report to "
                          f"(installed: {', '.join(loggers)}), or none for no logger")
    return value


def _distribution_of(target: str) -> str:
    """``distribution-version`` of the installed package that holds ``target``'s top-level module, if any."""
    top = target.partition(":")[0].split(".")[0]
    for dist_name in importlib.metadata.packages_distributions().get(top, []):
        try:
            return f"{dist_name}-{importlib.metadata.version(dist_name)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def check_roles(active: ActivePlugins, available: dict[str, AvailablePlugin]) -> None:
    """The role rules: at least one loss (the caller adds the default), at most one reference update."""
    if not active.losses:
        raise PluginError(f"a run takes at least one loss plugin, got none; name one in --plugins.\n{_describe(available)}")
    chosen = active.names("reference_update")
    if len(chosen) > 1:
        options = [n for n, ap in available.items() if _role_of(ap) == "reference_update"]
        raise PluginError(
            f"a run takes at most one reference_update plugin, got {', '.join(chosen)}; keep one of them in "
            f"--plugins (the reference_update plugins are: {', '.join(options)})"
        )


def check_hooks(pm: pluggy.PluginManager, info: PluginInfo, label: str) -> None:
    """Refuse, at activation, a plugin that lacks its role's hook or that wraps a hook.

    aligner calls each implementation itself (:meth:`ActivePlugins.call_each`), so a
    ``hookwrapper``/``wrapper`` implementation would return a generator instead of running.
    """
    impls = {caller.name: impl for caller in pm.get_hookcallers(pm.get_plugin(info.name)) or []
             for impl in caller.get_hookimpls() if impl.plugin_name == info.name}
    for hook_name, impl in impls.items():
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            raise PluginError(
                f"plugin '{label}' marks {hook_name} as a hook wrapper; aligner calls every implementation itself "
                f"and does not run wrappers: drop hookwrapper=True/wrapper=True and return the result"
            )
    required = REQUIRED_HOOKS[info.role]
    if required not in impls:
        raise PluginError(
            f"plugin '{label}' has role {info.role} but no {required} hook; a {info.role} plugin must implement "
            f"{required} (see aligner/hookspecs.py), or declare another role"
        )


def installed() -> ActivePlugins:
    """Every installed plugin that loads, in one manager, with no role checks: for questions asked of all of
    them (the config sections of inactive plugins, the report's panels). A broken one is left out."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    out = ActivePlugins(pm)
    for name, ap in available_plugins().items():
        try:
            plugin = ap.load()
            info = plugin_info(plugin, name)
            if info.name not in out.infos and pm.get_plugin(info.name) is None:
                pm.register(plugin, name=info.name)
                out.infos[info.name] = info
        except (PluginError, ValueError):
            continue
    return out


def inactive_sections(active: ActivePlugins) -> dict[str, str]:
    """Config section -> how to activate its plugin, for every installed plugin that is not active (so a config
    that sets one gets "add it to --plugins" or "add it to report_to" rather than "unknown key"). A plugin that
    fails here is skipped: it fails only runs that name it."""
    everything = installed()
    out: dict[str, str] = {}
    for name, info in everything.infos.items():
        if name in active.infos:
            continue
        try:
            section = everything.call_one(name, "aligner_config_section")
        except PluginHookError:
            continue
        if section:
            place = "report_to" if info.role == "logger" else "--plugins"
            out[section[0]] = f"plugin '{name}', which is not active; add it to {place}"
    return out


def _role_of(ap: AvailablePlugin) -> str | None:
    try:
        return plugin_info(ap.load(), ap.name).role
    except PluginError:
        return None


def list_plugins_table() -> str:
    """The text that ``--list-plugins`` prints: name, role, distribution and summary of each plugin."""
    lines = [f"{'name':<12} {'role':<17} {'package':<22} summary"]
    for name, ap in available_plugins().items():
        try:
            info = plugin_info(ap.load(), name)
            lines.append(f"{name:<12} {info.role:<17} {ap.distribution:<22} {info.summary}")
        except PluginError as exc:
            lines.append(f"{name:<12} {'broken':<17} {ap.distribution:<22} broken: {exc}")
    return "\n".join(lines)
