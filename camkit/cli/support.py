"""Small helpers the command-line modules share: optional imports and one-line error texts."""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType

from ..errors import MissingDependencyError

__all__ = [
    "first_line",
    "message_lines",
    "require",
]


# -- optional packages -----------------------------------------------------------------------
def require(module: str, package: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` saying how to install it.

    Args:
        module: the module to import (``"timm"``, ``"torchvision.models"``).
        package: the distribution that provides it, for ``pip install``.
        purpose: what needs it, for the message (``"model spec 'timm:resnet50'"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] == top:
            raise MissingDependencyError(
                f"{purpose} needs the {package!r} package, which is not installed: "
                f"pip install {package}"
            ) from exc
        raise MissingDependencyError(
            f"{purpose} needs {package!r}, which is installed but failed to import ({exc}); "
            f"reinstall it: pip install --upgrade {package}"
        ) from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def message_lines(exc: BaseException) -> list[str]:
    """The lines of an exception's message, stripped, without terminal colours."""
    return [line.strip() for line in _ANSI.sub("", str(exc)).splitlines()]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colours (or its type's name)."""
    lines = [line for line in message_lines(exc) if line]
    return lines[0] if lines else type(exc).__name__
