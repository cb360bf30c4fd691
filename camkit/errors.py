"""Errors and warnings a user of camkit can meet.

Every error a user can cause is a :class:`CamkitError`. Messages say what was expected, what was
received and what to do about it.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable

__all__ = [
    "BlankMapWarning",
    "CamkitError",
    "CamkitWarning",
    "CheckpointError",
    "ImageError",
    "InputError",
    "LayerError",
    "MissingDependencyError",
    "ModelError",
    "ModelSpecError",
    "OptionError",
    "PluginError",
    "TargetError",
    "UnknownLayerError",
    "UnknownMethodError",
    "UnknownMetricError",
    "UsageError",
]


class CamkitError(Exception):
    """Base class of every error camkit raises for something the caller can fix."""


class CamkitWarning(UserWarning):
    """Base class of camkit's warnings."""


class BlankMapWarning(CamkitWarning):
    """Maps that came out blank (constant, so all zero once normalised), with the reason."""


class InputError(CamkitError, TypeError):
    """The input batch is not something camkit can explain (type, size, values, grad mode)."""


class LayerError(CamkitError):
    """A target layer cannot be used (no spatial output, runs twice, not on the score's path)."""


class UnknownLayerError(LayerError, KeyError):
    """A layer name that does not exist in the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelError(CamkitError):
    """The model does not support what was asked of it (an activation without a guided rule)."""


class OptionError(CamkitError, TypeError):
    """An option that is unknown or has a value of the wrong kind."""


class TargetError(CamkitError, ValueError):
    """A target that does not fit the batch or the model's output."""


class PluginError(CamkitError):
    """A plugin that fails to load or registers something invalid."""


class UnknownMethodError(CamkitError, KeyError):
    """A method name that no loaded plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownMetricError(CamkitError, KeyError):
    """A metric name that no loaded plugin registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# -- the command line and its helpers -------------------------------------------------------
class UsageError(CamkitError):
    """A command line that cannot work, found after parsing (the ``camkit`` command exits with
    status 2)."""


class ImageError(CamkitError):
    """An image that cannot be read or written, or an output folder that cannot be used."""


class ModelSpecError(CamkitError):
    """A model spec that does not name a model camkit can build."""


class CheckpointError(CamkitError):
    """Weights that cannot be loaded, or a checkpoint that does not match the model."""


class MissingDependencyError(CamkitError, ImportError):
    """An optional package that is needed for what was asked is not installed."""


def close_matches(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Names among ``candidates`` that look like ``word``, best first."""
    candidates = list(candidates)
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if not found:  # a suffix typed alone ("conv2") should still find "layer4.1.conv2"
        found = [c for c in candidates if c.endswith("." + word) or c.endswith(word)][:n]
    return found


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """A ``" Did you mean ...?"`` sentence, or an empty string when nothing is close."""
    found = close_matches(word, candidates)
    if not found:
        return ""
    return " Did you mean " + ", ".join(repr(f) for f in found) + "?"


_OWN_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside camkit and
    its built-in plugins, so a warning names the caller's line whatever the call depth."""
    own: tuple[str, ...] = _OWN_DIRS
    plugins = sys.modules.get("camkit_plugins")  # the built-ins, once loaded
    if plugins is not None and plugins.__file__:
        own = (*own, os.path.dirname(os.path.abspath(plugins.__file__)) + os.sep)
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(own):
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    return level
