"""The values of the command line: argument types, ``--option`` values, ``--device``,
``--labels`` and ``--method``.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CamkitError
from ..method import Method
from ..registry import default_registry

__all__ = [
    "TargetForm",
    "class_indices",
    "floats",
    "key_value",
    "method_named",
    "parse_value",
    "positive_int",
    "read_labels",
    "resolve_device",
    "size",
    "stds",
    "target_form",
]


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.replace("x", ",").split(",") if t.strip()]


def size(text: str) -> tuple[int, int]:
    """``--size``: ``H``, ``H,W`` or ``HxW`` (positive ints) as ``(H, W)``."""
    try:
        values = [int(t) for t in _split(text)]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or H,W (positive ints); got {text!r}")
    return (values[0], values[-1])


def floats(text: str) -> tuple[float, ...]:
    """``--mean``: one number or three (``a,b,c``)."""
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if len(values) not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected 1 or 3 numbers (a or a,b,c); got {text!r}")
    return values


def stds(text: str) -> tuple[float, ...]:
    """``--std``: one positive number or three."""
    values = floats(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers; got {text!r}")
    return values


def class_indices(text: str) -> list[int]:
    """``--target``: a class index, or comma-separated indices (one per image)."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(
            f"expected a class index or comma-separated indices; got {text!r}"
        )
    return values


@dataclass(frozen=True)
class TargetForm:
    """A ``--target`` for a detection or segmentation model.

    Attributes:
        kind: ``"box"`` (one predicted box: by ``index``, or the best match of ``box``) or
            ``"mask"`` (segmentation class ``category`` summed over its predicted mask).
        index: the prediction's index (``box:INDEX``).
        box: ``(x1, y1, x2, y2)`` in the output's coordinates (``box:X1,Y1,X2,Y2``).
        label: the box's class (``...@LABEL``), or ``None``: its best class.
        category: the segmentation class (``mask:C``).
    """

    kind: str
    index: int | None = None
    box: tuple[float, float, float, float] | None = None
    label: int | None = None
    category: int | None = None


def target_form(text: str) -> list[int] | TargetForm:
    """``--target``: class indices (:func:`class_indices`), ``box:INDEX[@LABEL]``,
    ``box:X1,Y1,X2,Y2[@LABEL]`` or ``mask:C``."""
    kind, sep, rest = text.partition(":")
    if not sep:
        return class_indices(text)
    body, at, label_text = rest.partition("@")
    try:
        label = int(label_text) if at else None
        values = [float(v) for v in body.split(",")]
    except ValueError:
        values, label = [], None
    if kind == "box" and len(values) == 1 and values[0].is_integer():
        return TargetForm("box", index=int(values[0]), label=label)
    if kind == "box" and len(values) == 4:
        return TargetForm("box", box=(values[0], values[1], values[2], values[3]), label=label)
    if kind == "mask" and len(values) == 1 and values[0].is_integer() and not at:
        return TargetForm("mask", category=int(values[0]))
    raise argparse.ArgumentTypeError(
        f"expected class indices, box:INDEX[@LABEL], box:X1,Y1,X2,Y2[@LABEL] or mask:C; "
        f"got {text!r}"
    )


def positive_int(text: str) -> int:
    """``--batch-size``, ``--num-classes``: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int; got {text!r}")
    return value


def parse_value(text: str) -> Any:
    """An ``--option`` value: int, float, ``true``/``false``, ``none``, a comma-separated tuple
    of those, or the text itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(parse_value(t.strip()) for t in text.split(",") if t.strip())
    return text


def key_value(text: str) -> tuple[str, Any]:
    """``--option KEY=VALUE`` as ``(key, value)``: dashes in the key become underscores and the
    value is read by :func:`parse_value`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value; got {text!r}")
    return key.strip().replace("-", "_"), parse_value(value)


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Class names by index: a JSON list, a JSON object ``{"0": "cat", ...}``, or one per line.

    Raises:
        CamkitError: the file cannot be read or holds no labels.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CamkitError(f"cannot read the labels file {p}: {exc}.") from exc
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CamkitError(f"the labels file {p} is not valid JSON: {exc}.") from exc
        if isinstance(data, list):
            labels = [str(v) for v in data]
        elif isinstance(data, dict) and all(str(k).isdigit() for k in data):
            n = max(int(k) for k in data) + 1 if data else 0
            labels = [str(data.get(str(i), "")) for i in range(n)]
        else:
            raise CamkitError(
                f"the labels file {p} must hold a JSON list of names or an object mapping "
                "class indices to names."
            )
    else:
        labels = [line.strip() for line in text.splitlines()]
        while labels and not labels[-1]:
            labels.pop()
    if not labels:
        raise CamkitError(f"the labels file {p} holds no labels.")
    return labels


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU) or a torch device name, checked.

    Raises:
        CamkitError: the name is not a device, or the device is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CamkitError(f"--device expects auto, cpu, cuda or cuda:N; got {name!r}.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CamkitError(
                f"device {name!r} was asked for, but CUDA is not available here "
                "(torch.cuda.is_available() is False); use --device cpu or auto."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CamkitError(
                f"device {name!r} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CamkitError(f"device {name!r} is not available here; use --device cpu or auto.")
    return device


def method_named(name: str) -> Method:
    """The method ``--method`` (or ``--methods``) names; an unknown name's error says to run
    ``camkit methods``."""
    return default_registry().get(name, how_to_list="List them with 'camkit methods'.")
