"""The method registry: a pluggy plugin manager and the names it knows.

camkit's built-in methods and third-party ones load the same way: each distribution advertises
a module under the entry-point group ``camkit`` and that module implements
:func:`~camkit.hookspecs.register_methods`. ``CAMKIT_LOAD_PLUGINS`` (comma-separated
distribution names; empty for none) restricts which third-party distributions load; camkit's
own built-ins always load.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata as md
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import pluggy

from . import hookspecs
from .errors import (
    OptionError,
    PluginError,
    UnknownMethodError,
    UnknownMetricError,
    did_you_mean,
)
from .method import Method
from .metric import METRIC_OPTIONS, NEEDS, Metric

__all__ = ["Registry", "default_registry", "list_methods", "list_metrics", "reset_registry"]

_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_ALIAS = re.compile(r"^[a-z][a-z0-9+]*(-[a-z0-9+]+)*$")
ENV = "CAMKIT_LOAD_PLUGINS"


def _normalize_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Registry:
    """Loaded plugins and the methods they registered.

    Args:
        load_entrypoints: load plugins advertised under the ``camkit`` entry-point group now
            (honouring ``CAMKIT_LOAD_PLUGINS``). Tests pass ``False`` to start empty.
    """

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager("camkit")
        self.pm.add_hookspecs(hookspecs)
        self._methods: dict[str, Method] = {}
        self._names: dict[str, str] = {}  # name or alias -> canonical name
        self._owners: dict[str, str] = {}  # name or alias -> plugin name
        self._dists: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._metrics: dict[str, Metric] = {}  # metric name or alias -> metric
        self._metric_owners: dict[str, str] = {}  # metric name or alias -> plugin name
        self.builtins_found = False
        if load_entrypoints:
            self.load_entrypoints()

    # -- loading ---------------------------------------------------------------------------
    def load_entrypoints(self) -> None:
        """Load every plugin of the ``camkit`` entry-point group that ``CAMKIT_LOAD_PLUGINS``
        allows; camkit's own always load."""
        allowed_env = os.environ.get(ENV)
        allowed = (
            None
            if allowed_env is None
            else {_normalize_dist(d.strip()) for d in allowed_env.split(",") if d.strip()}
        )
        seen: set[tuple[str, str]] = set()
        for ep in md.entry_points(group="camkit"):
            dist = ep.dist
            dist_name = _normalize_dist(dist.name) if dist is not None else ""
            version = dist.version if dist is not None else ""
            if (dist_name, ep.name) in seen:
                continue  # the same distribution found twice on sys.path
            seen.add((dist_name, ep.name))
            builtin = dist_name == "camkit"
            if not builtin and allowed is not None and dist_name not in allowed:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} of distribution {dist_name or '?'!r} failed to import "
                    f"({ep.value}): {type(exc).__name__}: {exc}. Fix or uninstall it, or leave "
                    f"it out with {ENV}=<the distributions to load>."
                ) from exc
            name = ep.name if builtin else f"{dist_name}:{ep.name}"
            if self.pm.is_registered(plugin) or self.pm.has_plugin(name):
                continue
            self.register_plugin(plugin, name=name, distribution=(dist_name, version))
            self.builtins_found |= builtin

    def register_plugin(
        self,
        plugin: object,
        name: str | None = None,
        distribution: tuple[str, str] = ("", ""),
    ) -> str:
        """Register ``plugin`` (a module or object with hook implementations) and run its
        ``register_methods``; returns the plugin's name."""
        try:
            pname = self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except (ValueError, pluggy.PluginValidationError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise PluginError(f"plugin {name or plugin!r} is invalid: {exc}") from exc
        assert pname is not None
        self._dists[pname] = distribution
        try:
            for impl in self.pm.hook.register_methods.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=self._registrar(pname))
            for impl in self.pm.hook.register_metrics.get_hookimpls():
                if impl.plugin is plugin:
                    impl.function(register=lambda m: self.add_metric(m, pname))
        except Exception as exc:
            self._forget(pname)  # all or nothing: a failed plugin leaves no trace
            if isinstance(exc, PluginError):
                raise
            raise PluginError(
                f"plugin {pname!r} raised in register_methods or register_metrics: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return pname

    def _forget(self, plugin_name: str) -> None:
        keys = [k for k, owner in self._owners.items() if owner == plugin_name]
        for key in keys:
            self._methods.pop(key, None)
            del self._names[key], self._owners[key]
        for key in [k for k, owner in self._metric_owners.items() if owner == plugin_name]:
            del self._metrics[key], self._metric_owners[key]
        self._dists.pop(plugin_name, None)
        if self.pm.has_plugin(plugin_name):
            self.pm.unregister(name=plugin_name)

    def _registrar(self, plugin_name: str) -> Callable[[Method], None]:
        def register(method: Method) -> None:
            self.add(method, plugin_name)

        return register

    def add(self, method: Method, plugin_name: str = "<direct>") -> None:
        """Validate and add one method instance on behalf of ``plugin_name``."""
        if isinstance(method, type) and issubclass(method, Method):
            raise PluginError(
                f"plugin {plugin_name!r} registered the class {method.__name__}; register an "
                f"instance: register({method.__name__}())."
            )
        if not isinstance(method, Method):
            raise PluginError(
                f"plugin {plugin_name!r} registered {type(method).__name__}; expected an "
                "instance of a camkit.Method subclass."
            )
        name = method.name
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"plugin {plugin_name!r} registered {type(method).__name__} with name "
                f"{name!r}; a method name is lowercase words joined by hyphens, like "
                "'grad-cam' or 'gradcam'."
            )
        for alias in method.aliases:
            if not isinstance(alias, str) or not _ALIAS.match(alias):
                raise PluginError(
                    f"plugin {plugin_name!r}: alias {alias!r} of method {name!r} must be "
                    "lowercase words joined by hyphens ('+' allowed)."
                )
        if type(method).weights is Method.weights:
            raise PluginError(
                f"plugin {plugin_name!r}: method {name!r} ({type(method).__name__}) does not "
                "implement weights(ctx)."
            )
        for flag in (
            "needs_gradients",
            "needs_hessian_vector",
            "needs_input_gradient",
            "uses_run_suffix",
            "differentiable",
        ):
            if not isinstance(getattr(method, flag), bool):
                raise PluginError(f"plugin {plugin_name!r}: {name!r}.{flag} must be a bool.")
        for flag in ("needs_hessian_vector", "needs_input_gradient"):
            if getattr(method, flag) and not method.needs_gradients:
                raise PluginError(
                    f"plugin {plugin_name!r}: {name!r} sets {flag}, which needs the gradients "
                    "too: set needs_gradients = True."
                )
        if not isinstance(method.options, dict):
            raise PluginError(
                f"plugin {plugin_name!r}: {name!r}.options must be a dict of option defaults."
            )
        from .options import COMMON_OPTIONS

        clash = sorted(set(method.options) & set(COMMON_OPTIONS))
        if clash:
            raise PluginError(
                f"plugin {plugin_name!r}: method {name!r} redeclares common option(s) "
                f"{', '.join(clash)}; declare only options of its own."
            )
        for key in (name, *method.aliases):
            if key in self._names:
                raise PluginError(
                    f"plugin {plugin_name!r} registers {key!r}, which plugin "
                    f"{self._owners[key]!r} already registered (method "
                    f"{self._names[key]!r}). Rename one of them."
                )
        self._methods[name] = method
        for key in (name, *method.aliases):
            self._names[key] = name
            self._owners[key] = plugin_name

    def add_metric(self, metric: Metric, plugin_name: str = "<direct>") -> None:
        """Validate and add one metric instance on behalf of ``plugin_name``."""
        what = type(metric).__name__
        if isinstance(metric, type) and issubclass(metric, Metric):
            raise PluginError(
                f"plugin {plugin_name!r} registered the class {metric.__name__}; register an "
                f"instance: register({metric.__name__}())."
            )
        if not isinstance(metric, Metric):
            raise PluginError(
                f"plugin {plugin_name!r} registered {what}; expected an instance of a "
                "camkit.Metric subclass."
            )
        name = metric.name
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(
                f"plugin {plugin_name!r} registered {what} with name {name!r}; a metric name is "
                "lowercase words joined by hyphens, like 'pointing-game'."
            )
        if type(metric).compute is Metric.compute:
            raise PluginError(
                f"plugin {plugin_name!r}: metric {name!r} does not implement compute."
            )
        if not isinstance(metric.higher_is_better, bool):
            raise PluginError(f"plugin {plugin_name!r}: {name!r}.higher_is_better must be a bool.")
        if not set(metric.needs) <= set(NEEDS):
            raise PluginError(
                f"plugin {plugin_name!r}: {name!r}.needs is {metric.needs!r}; expected a tuple of "
                f"{', '.join(map(repr, NEEDS))}."
            )
        clash = sorted(set(metric.options) & set(METRIC_OPTIONS))
        if not isinstance(metric.options, dict) or clash:
            raise PluginError(
                f"plugin {plugin_name!r}: {name!r}.options must be a dict of the metric's own "
                f"option defaults (not {', '.join(clash) or type(metric.options).__name__})."
            )
        for key in (name, *metric.aliases):
            if key in self._metrics:
                raise PluginError(
                    f"plugin {plugin_name!r} registers metric {key!r}, which plugin "
                    f"{self._metric_owners[key]!r} already registered. Rename one of them."
                )
        for key in (name, *metric.aliases):
            self._metrics[key] = metric
            self._metric_owners[key] = plugin_name

    def get_metric(self, name: str | Metric) -> Metric:
        """The metric registered as ``name`` (canonical or alias, case-insensitive)."""
        if isinstance(name, Metric):
            return name
        if not isinstance(name, str):
            raise UnknownMetricError(
                f"metric expects a name (str) or a camkit.Metric instance; got "
                f"{type(name).__name__}."
            )
        key = name.strip().lower().replace("_", "-")
        if key in self._metrics:
            return self._metrics[key]
        hint = did_you_mean(key, self._metrics)
        raise UnknownMetricError(
            f"unknown metric {name!r}.{hint} List metrics with camkit.list_metrics()."
        )

    def metric_names(self, filter: str = "*") -> list[str]:
        """Sorted canonical metric names matching the fnmatch pattern ``filter``."""
        return sorted(
            k for k, m in self._metrics.items() if k == m.name and fnmatch.fnmatchcase(k, filter)
        )

    # -- lookup ----------------------------------------------------------------------------
    def get(
        self, name: str | Method, *, how_to_list: str = "List methods with camkit.list_methods()."
    ) -> Method:
        """The method registered as ``name`` (canonical or alias, case-insensitive).

        Args:
            name: a method name or alias, or a :class:`~camkit.Method` (returned as it is).
            how_to_list: the sentence that ends the error for an unknown name, saying where
                the methods are listed (the ``camkit`` command names its own listing).
        """
        if isinstance(name, Method):
            return name
        if not isinstance(name, str):
            raise UnknownMethodError(
                f"method expects a name (str) or a camkit.Method instance; got "
                f"{type(name).__name__}."
            )
        key = name.strip().lower().replace("_", "-")
        if key in self._names:
            return self._methods[self._names[key]]
        hint = did_you_mean(key, self._names)
        missing = (
            ""
            if self.builtins_found
            else " camkit's built-in methods were not found: install camkit (pip install -e .) "
            "so its entry points exist."
        )
        raise UnknownMethodError(f"unknown method {name!r}.{hint}{missing} {how_to_list}")

    def default_layers(self, model: Any) -> list[str] | None:
        """The layer names an architecture adapter proposes for ``model``, or ``None``."""
        found = self.pm.hook.default_layers(model=model)
        if found is None:
            return None
        return [found] if isinstance(found, str) else list(found)

    def names(self, filter: str = "*") -> list[str]:
        """Sorted canonical names matching the fnmatch pattern ``filter``."""
        if not isinstance(filter, str):
            raise OptionError(
                f"filter expects an fnmatch pattern (str) such as 'grad*'; got "
                f"{type(filter).__name__}."
            )
        return sorted(n for n in self._methods if fnmatch.fnmatchcase(n, filter))

    def owner(self, name: str) -> str:
        """The plugin that registered method ``name``."""
        return self._owners[self._names[name]]

    def plugins(self) -> list[dict[str, Any]]:
        """One record per loaded plugin: name, distribution, version, hooks, methods."""
        out = []
        for pname, plugin in sorted(self.pm.list_name_plugin()):
            dist, version = self._dists.get(pname, ("", ""))
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            methods = sorted(
                m for m, owner in self._owners.items() if owner == pname and m in self._methods
            )
            metrics = sorted(
                k
                for k, owner in self._metric_owners.items()
                if owner == pname and self._metrics[k].name == k
            )
            out.append(
                {
                    "name": pname,
                    "distribution": dist,
                    "version": version,
                    "hooks": hooks,
                    "methods": methods,
                    "metrics": metrics,
                }
            )
        return out


_default: Registry | None = None
_lock = threading.Lock()


def default_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = Registry()
        return _default


def set_default_registry(registry: Registry | None) -> Registry | None:
    """Replace the process-wide registry (``None``: reload on next use); returns the old one."""
    global _default
    with _lock:
        old, _default = _default, registry
    return old


def reset_registry() -> None:
    """Forget the process-wide registry; the next use reloads plugins (and the environment)."""
    set_default_registry(None)


def list_methods(filter: str = "*") -> list[str]:
    """Sorted canonical names of the available methods matching the fnmatch glob ``filter``."""
    return default_registry().names(filter)


def list_metrics(filter: str = "*") -> list[str]:
    """Sorted canonical names of the available metrics matching the fnmatch glob ``filter``."""
    return default_registry().metric_names(filter)
