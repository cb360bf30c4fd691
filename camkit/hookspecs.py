"""The hooks a camkit plugin can implement.

A plugin is a module (or object) advertised under the entry-point group ``camkit`` whose
functions are marked with :data:`hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from .method import Method
    from .metric import Metric

__all__ = ["default_layers", "hookimpl", "hookspec", "register_methods", "register_metrics"]

hookspec = pluggy.HookspecMarker("camkit")
#: Marks a plugin's implementation of a camkit hook.
hookimpl = pluggy.HookimplMarker("camkit")


@hookspec
def register_methods(register: Callable[[Method], None]) -> None:
    """Register the CAM methods a plugin provides.

    Called once for each plugin, when the registry loads it. Call ``register(method)`` with an
    instance of a :class:`camkit.Method` subclass for each method. Each registration is checked
    as it is made: the type, the name's syntax (lowercase words joined by hyphens) and that
    neither the name nor an alias is taken; a failure raises :class:`camkit.PluginError`
    naming the plugin.

    The return value is ignored.
    """


@hookspec
def register_metrics(register: Callable[[Metric], None]) -> None:
    """Register the explanation-quality metrics a plugin provides.

    Called once for each plugin, when the registry loads it, after ``register_methods``. Call
    ``register(metric)`` with an instance of a :class:`camkit.Metric` subclass for each metric.
    Each registration is checked as it is made (the type, the name's syntax, that the name is
    free, ``higher_is_better``, ``needs`` and ``options``); a failure raises
    :class:`camkit.PluginError` naming the plugin.

    The return value is ignored.
    """


@hookspec(firstresult=True)
def default_layers(model: nn.Module) -> str | list[str] | None:
    """Propose the layer(s) to explain when the caller passes ``layer=None``.

    Called with the model (an ``nn.Module``; ``nn.DataParallel`` is already unwrapped) the first
    time it is explained without a layer. Return a dotted layer name, or a list of names, for
    architectures the plugin recognises, and ``None`` otherwise; the first plugin to answer
    wins, and when none does camkit searches the model (see :mod:`camkit.layers`). The layer's
    layout (channels first or last, transformer tokens) is recognised from its output, so an
    adapter returns names only. A name that does not exist in the model is a
    :class:`camkit.PluginError`.
    """
