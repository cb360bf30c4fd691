"""The ``camkit`` command (``explain``, ``methods``, ``plugins``, ``demo``) and its helpers.

The modules, by concern:

- :mod:`camkit.cli.parser`: the argument parser and :func:`main`;
- :mod:`camkit.cli.explain` and :mod:`camkit.cli.commands`: what each command does;
- :mod:`camkit.cli.values`: argument types, ``--option`` values, devices, labels files;
- :mod:`camkit.cli.images`: reading and writing images;
- :mod:`camkit.cli.preprocess`: image to model input, as torchvision's transforms do;
- :mod:`camkit.cli.models` and :mod:`camkit.cli.checkpoints`: models from a spec, and
  checkpoints loaded with ``weights_only=True``;
- :mod:`camkit.cli.output`: files moved into place only when everything succeeded.

The helpers work on their own (``from camkit.cli import Preprocess, load_model, read_image``);
every failure a user can cause is a :class:`~camkit.CamkitError` whose message says what to do.
"""

from __future__ import annotations

from ..errors import (
    CheckpointError,
    ImageError,
    MissingDependencyError,
    ModelSpecError,
    UsageError,
)
from .checkpoints import load_checkpoint, read_checkpoint
from .images import check_image, read_image, write_image
from .models import LoadedModel, load_model
from .output import staged_output
from .parser import build_parser, main
from .preprocess import (
    DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    preprocess_from_timm,
    preprocess_from_torchvision,
)
from .support import require
from .values import parse_value, read_labels, resolve_device

__all__ = [
    "DEFAULT_SIZE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CheckpointError",
    "ImageError",
    "LoadedModel",
    "MissingDependencyError",
    "ModelSpecError",
    "Preprocess",
    "UsageError",
    "build_parser",
    "check_image",
    "load_checkpoint",
    "load_model",
    "main",
    "parse_value",
    "preprocess_from_timm",
    "preprocess_from_torchvision",
    "read_checkpoint",
    "read_image",
    "read_labels",
    "require",
    "resolve_device",
    "staged_output",
    "write_image",
]
