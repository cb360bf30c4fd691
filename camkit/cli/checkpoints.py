"""Checkpoints: a state_dict read with ``torch.load(..., weights_only=True)`` (or safetensors)
and loaded strictly, naming every key that does not match the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .support import first_line, message_lines, require

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "is_checkpoint_path",
    "load_checkpoint",
    "read_checkpoint",
]


#: File suffixes read as checkpoints even when the file does not exist yet.
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"}


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one sentence of camkit's own (torch's
    message advises retrying with ``weights_only=False``, which is not camkit's to suggest)."""
    text = " ".join(message_lines(exc))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found is not None:
        return (
            f"it holds a pickled reference to {found.group(1)}, a Python class or function, "
            "and unpickling one can run any code, so camkit's safe load (torch.load with "
            "weights_only=True) refuses it"
        )
    if "WeightsUnpickler" in text or "Weights only load failed" in text:
        return (
            "it holds pickled data other than tensors and plain containers (or is damaged), "
            "which camkit's safe load (torch.load with weights_only=True) refuses"
        )
    return first_line(exc)


_TRUSTED = (
    "A checkpoint should hold only the weights: save them with "
    "torch.save(model.state_dict(), path). To use a file you trust (you know who made it), "
    "convert it once yourself, knowing that loading it runs its code: "
    "torch.save(torch.load(path, weights_only=False).state_dict(), 'weights.pt'), then pass "
    "weights.pt."
)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state_dict from ``path``.

    A ``.safetensors`` file is read with ``safetensors.torch.load_file``; anything else with
    ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses pickled objects
    other than tensors and plain containers. The file may hold the state_dict itself or a dict
    with it under ``"state_dict"``, ``"model_state_dict"`` or ``"model"``.

    Raises:
        CheckpointError: the file is missing, cannot be loaded, or holds no state_dict.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: no such file.")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} is not a file.")
    obj: Any
    if p.suffix.lower() == ".safetensors":
        st = require("safetensors.torch", "safetensors", f"the checkpoint {p}")
        try:
            obj = st.load_file(str(p))
        except Exception as exc:
            raise CheckpointError(f"cannot load checkpoint {p}: {first_line(exc)}") from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot load checkpoint {p}: {_load_failure(exc)}. {_TRUSTED}"
            ) from exc
    state = obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state:
        what = "an empty mapping" if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {p} holds {what}, not a state_dict (parameter names mapped to "
            "tensors) or {'state_dict': ...}. Save it with torch.save(model.state_dict(), path)."
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"checkpoint {p} is not a state_dict: entry {bad[0]!r} is a "
            f"{type(state[bad[0]]).__name__}, not a tensor ({len(bad)} such entries). Save it "
            "with torch.save(model.state_dict(), path)."
        )
    return dict(state)


def _listing(items: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _strip_prefix(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` (DataParallel) or ``model.`` prefix every key has and the model lacks."""
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state) and not any(
            k.startswith(prefix) for k in expected
        ):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    what: str = "the model",
    num_classes_hint: bool = False,
) -> None:
    """Load the state_dict at ``path`` into ``model`` with ``strict=True``.

    Keys are compared first, so a mismatch names the missing keys, the unexpected keys and the
    tensors whose shapes differ.

    Args:
        model: the model to load into.
        path: a checkpoint file (see :func:`read_checkpoint`).
        what: the model's name, for messages.
        num_classes_hint: suggest ``--num-classes`` when only a classifier's size differs.

    Raises:
        CheckpointError: the checkpoint cannot be read or does not match ``model``.
    """
    expected = model.state_dict()
    state = _strip_prefix(read_checkpoint(path), expected)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in state
        if k in expected and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if shapes:
            desc = [f"{k} {got} in the checkpoint, {want} in the model" for k, got, want in shapes]
            parts.append(f"{len(shapes)} shape mismatch(es): {_listing(desc, 3)}")
        hint = "Pass the checkpoint of this architecture, or a spec that builds the saved model."
        heads = {
            got[0] if len(got) == len(want) >= 1 and got[1:] == want[1:] else None
            for _, got, want in shapes
        }
        if num_classes_hint and not missing and not unexpected and len(heads) == 1:
            k = heads.pop()
            if k is not None:
                hint = f"The checkpoint's classifier has {k} classes: pass --num-classes {k}."
        raise CheckpointError(
            f"checkpoint {Path(path)} does not match {what}: {'; '.join(parts)}. {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {Path(path)} does not load into {what}: {first_line(exc)}"
        ) from exc


def is_checkpoint_path(text: str) -> bool:
    """Whether ``--weights`` text names a checkpoint file rather than a weights name."""
    p = Path(text)
    return "/" in text or os.sep in text or p.suffix.lower() in CHECKPOINT_SUFFIXES or p.exists()
