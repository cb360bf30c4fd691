"""The hooks a camkit plugin can implement.

A plugin is a module (or object) advertised under the entry-point group ``camkit`` whose
functions are marked with :data:`hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .method import Method

__all__ = ["hookimpl", "hookspec", "register_methods"]

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
