"""Images, models and files for the ``camkit`` command, usable on their own.

- :func:`read_image` and :func:`write_image` read and write RGB images with OpenCV (any path,
  including non-ASCII ones); :func:`check_image` tells early whether a file can be read.
- :class:`Preprocess` turns an image into a model input the way torchvision's
  ``weights.transforms()`` do (resize, centre crop, scale to [0, 1], normalise), and keeps the
  resized, cropped image for overlays.
- :func:`load_model` builds a model from a spec (``torchvision:NAME``, ``timm:NAME``,
  ``module.path:factory``) with its weights, categories and preprocessing when they are known.
- :func:`load_checkpoint` loads a state_dict with ``torch.load(..., weights_only=True)`` and
  names every key that does not match the model.
- :func:`staged_output` writes a folder's files elsewhere first and moves them into place only
  when everything succeeded.

Every failure a user can cause is a :class:`~camkit.CamkitError` with a message that says what
to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import (
    CamkitError,
    CheckpointError,
    ImageError,
    MissingDependencyError,
    ModelSpecError,
    did_you_mean,
)

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
    "check_image",
    "load_checkpoint",
    "load_model",
    "read_checkpoint",
    "read_image",
    "read_labels",
    "require",
    "resolve_device",
    "staged_output",
    "write_image",
]

#: ImageNet channel means and standard deviations (RGB, for inputs scaled to [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Input size ``(H, W)`` used when neither the weights nor the caller give one.
DEFAULT_SIZE: tuple[int, int] = (224, 224)

_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors"}
_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic")


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


# -- images ----------------------------------------------------------------------------------
def _image_problem(p: Path) -> str | None:
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "it is a directory; pass image files (a shell glob such as dir/*.jpg)"
    return None


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    Grey images are repeated to three channels, an alpha channel is dropped and 16-bit images
    are scaled to 8 bits (OpenCV's ``IMREAD_COLOR``).

    Raises:
        ImageError: the file does not exist, cannot be read or is not a decodable image.
    """
    p = Path(path)
    problem = _image_problem(p)
    if problem:
        raise ImageError(f"cannot read image {p}: {problem}.")
    try:
        data = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise ImageError(f"cannot read image {p}: {exc.strerror or exc}.") from exc
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ImageError(
            f"cannot read image {p}: not an image OpenCV can decode (PNG, JPEG, BMP, TIFF, "
            "WebP, ...), or the file is damaged."
        )
    return np.ascontiguousarray(img[:, :, ::-1])


def check_image(path: str | os.PathLike[str]) -> None:
    """Raise :class:`ImageError` unless ``path`` looks like an image OpenCV can read.

    Only the file's header is read when OpenCV recognises it; otherwise the file is decoded to
    be sure.
    """
    p = Path(path)
    problem = _image_problem(p)
    if problem:
        raise ImageError(f"cannot read image {p}: {problem}.")
    try:
        known = bool(cv2.haveImageReader(str(p)))
    except cv2.error:
        known = False
    if not known:
        read_image(p)


def write_image(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an ``(H, W, 3)`` uint8 RGB image; the format follows the file's suffix.

    Raises:
        ImageError: the format is unknown or the file cannot be written.
    """
    p = Path(path)
    img = np.asarray(rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ImageError(
            f"write_image expects an (H, W, 3) uint8 RGB image; got shape {img.shape} of "
            f"{img.dtype}."
        )
    try:
        ok, buf = cv2.imencode(p.suffix or ".png", np.ascontiguousarray(img[:, :, ::-1]))
    except cv2.error as exc:
        raise ImageError(f"cannot encode image {p}: {str(exc).strip()}") from exc
    if not ok:
        raise ImageError(f"cannot encode image {p} as {p.suffix or '.png'}.")
    try:
        buf.tofile(p)
    except OSError as exc:
        raise ImageError(f"cannot write image {p}: {exc.strerror or exc}.") from exc


# -- preprocessing ---------------------------------------------------------------------------
def _resize(img: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """Resize a ``(3, H, W)`` uint8 image to ``size`` as torchvision does for tensors."""
    if tuple(img.shape[1:]) == size:
        return img
    x = img.unsqueeze(0).float()
    if mode in ("bilinear", "bicubic"):
        y = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    else:
        y = F.interpolate(x, size=size, mode=mode)
    return y.round().clamp(0, 255).to(torch.uint8)[0]


def _centre_crop(img: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop the centre ``size`` of a ``(3, H, W)`` image, padding with zeros when smaller."""
    ch, cw = size
    h, w = int(img.shape[1]), int(img.shape[2])
    if ch > h or cw > w:
        pad = [
            (cw - w) // 2 if cw > w else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        ]
        img = F.pad(img, pad, value=0)
        h, w = int(img.shape[1]), int(img.shape[2])
        if (h, w) == size:
            return img
    top = round((h - ch) / 2.0)
    left = round((w - cw) / 2.0)
    return img[:, top : top + ch, left : left + cw]


@dataclass(frozen=True)
class Preprocess:
    """Image to model input: resize, centre crop, scale to [0, 1], normalise.

    With ``resize`` set, the shorter side is resized to ``resize`` (keeping the aspect ratio)
    and the centre ``size`` is cropped, as torchvision's ``weights.transforms()`` do; with
    ``resize=None`` the image is resized straight to ``size`` (the aspect ratio is not kept).
    Resizing is antialiased for ``bilinear`` and ``bicubic`` and rounds back to uint8, so the
    input matches torchvision's transforms applied to the decoded image.

    Attributes:
        size: ``(H, W)`` of the model input, and of the maps.
        mean: per-channel mean (RGB, for values in [0, 1]).
        std: per-channel standard deviation.
        resize: the shorter side before the centre crop, or ``None``.
        interpolation: ``bilinear``, ``bicubic``, ``nearest`` or ``nearest-exact``.
        source: where these settings come from, in words.
    """

    size: tuple[int, int] = DEFAULT_SIZE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: int | None = None
    interpolation: str = "bilinear"
    source: str = "defaults"

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise CamkitError(f"the input size must be two positive ints (H, W); got {self.size}.")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, 3):
                raise CamkitError(f"{name} needs 1 or 3 values (RGB); got {len(v)}: {v}.")
        if min(self.std) <= 0:
            raise CamkitError(f"std values must be positive; got {self.std}.")
        if self.resize is not None and self.resize < 1:
            raise CamkitError(f"the resize size must be a positive int; got {self.resize}.")
        if self.interpolation not in _INTERPOLATIONS:
            raise CamkitError(
                f"interpolation expects one of {', '.join(_INTERPOLATIONS)}; got "
                f"{self.interpolation!r}."
            )

    def display(self, rgb: np.ndarray) -> np.ndarray:
        """The resized, cropped image ``(H, W, 3)`` uint8 RGB the model sees, before scaling."""
        img = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
        if self.resize is not None:
            h, w = int(img.shape[1]), int(img.shape[2])
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.resize * long / short)
            new = (new_long, self.resize) if w <= h else (self.resize, new_long)
            img = _centre_crop(_resize(img, new, self.interpolation), self.size)
        else:
            img = _resize(img, self.size, self.interpolation)
        out: np.ndarray = img.permute(1, 2, 0).contiguous().numpy()
        return out

    def tensor(self, display: np.ndarray) -> Tensor:
        """The normalised ``(3, H, W)`` float32 input for a :meth:`display` image."""
        x = torch.from_numpy(np.ascontiguousarray(display)).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).reshape(-1, 1, 1)
        return (x - mean) / std

    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, Tensor]:
        """``(display image (H, W, 3) uint8, input (3, H, W) float32)`` for an RGB image."""
        shown = self.display(rgb)
        return shown, self.tensor(shown)

    def describe(self) -> str:
        """The steps, in words."""
        h, w = self.size
        if self.resize is not None:
            steps = (
                f"resize shorter side to {self.resize} ({self.interpolation}), centre crop {h}x{w}"
            )
        else:
            steps = f"resize to {h}x{w} ({self.interpolation})"
        mean = ", ".join(f"{v:g}" for v in self.mean)
        std = ", ".join(f"{v:g}" for v in self.std)
        return f"{steps}, scale to [0, 1], mean ({mean}), std ({std}) [{self.source}]"

    def as_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return {
            "size": list(self.size),
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
        }


def _first(v: Any) -> int:
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def preprocess_from_torchvision(weights: Any) -> Preprocess:
    """The :class:`Preprocess` equal to ``weights.transforms()`` of a torchvision weights enum."""
    t = weights.transforms()
    try:
        crop, resize = _first(t.crop_size), _first(t.resize_size)
        mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        mode = getattr(t.interpolation, "value", str(t.interpolation))
    except (AttributeError, TypeError, IndexError) as exc:
        raise ModelSpecError(
            f"the transforms of {weights} ({type(t).__name__}) are not a resize, crop and "
            "normalise camkit knows; pass --size, --mean and --std."
        ) from exc
    return Preprocess(
        size=(crop, crop),
        mean=mean,
        std=std,
        resize=resize,
        interpolation=mode if mode in _INTERPOLATIONS else "bilinear",
        source=f"{weights}.transforms()",
    )


def preprocess_from_timm(config: Mapping[str, Any], name: str) -> Preprocess:
    """The :class:`Preprocess` of a timm data config (``timm.data.resolve_data_config``)."""
    _, h, w = (int(v) for v in config.get("input_size", (3, *DEFAULT_SIZE)))
    crop_pct = config.get("crop_pct")
    mode = str(config.get("interpolation", "bicubic"))
    resize = None
    if crop_pct and config.get("crop_mode", "center") == "center" and h == w:
        resize = int(h / float(crop_pct))  # timm: floor(size / crop_pct)
    return Preprocess(
        size=(h, w),
        mean=tuple(float(v) for v in config.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in config.get("std", IMAGENET_STD)),
        resize=resize,
        interpolation=mode if mode in _INTERPOLATIONS else "bicubic",
        source=f"timm data config of {name}",
    )


# -- checkpoints -----------------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: BaseException) -> str:
    text = _ANSI.sub("", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in one sentence."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines()]
    refused = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), None)
    if refused is not None:
        detail = refused.removeprefix("WeightsUnpickler error:").strip().split(". ")[0]
        return f"it holds pickled objects other than tensors, which are refused ({detail})"
    return _first_line(exc)


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
            raise CheckpointError(f"cannot load checkpoint {p}: {_first_line(exc)}") from exc
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"cannot load checkpoint {p} with torch.load(weights_only=True): "
                f"{_load_failure(exc)}. Save the weights with "
                "torch.save(model.state_dict(), path), not the whole model."
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
            f"checkpoint {Path(path)} does not load into {what}: {_first_line(exc)}"
        ) from exc


def _is_path(text: str) -> bool:
    p = Path(text)
    return "/" in text or os.sep in text or p.suffix.lower() in _CHECKPOINT_SUFFIXES or p.exists()


# -- models ----------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model built from a spec, in eval mode, on the CPU.

    Attributes:
        model: the model.
        spec: the spec it was built from.
        weights: the weights loaded, in words (``None`` when none were).
        categories: class names by index, when the weights carry them.
        preprocess: the preprocessing the weights were trained with, when known.
        random_init: the model has the random weights of its constructor.
    """

    model: nn.Module
    spec: str
    weights: str | None = None
    categories: list[str] | None = None
    preprocess: Preprocess | None = None
    random_init: bool = False


def load_model(
    spec: str, weights: str | None = None, num_classes: int | None = None
) -> LoadedModel:
    """Build the model ``spec`` names and load ``weights`` into it.

    Args:
        spec: ``torchvision:NAME`` (an image classification model of ``torchvision.models``),
            ``timm:NAME`` (needs timm) or ``module.path:factory`` (``path/to/file.py:factory``
            works too): the module is imported with the current directory on ``sys.path`` and
            the factory (a function or class, dotted attributes allowed) is called with no
            arguments.
        weights: for torchvision, a weights name (``DEFAULT``, ``IMAGENET1K_V1``,
            ``ResNet18_Weights.IMAGENET1K_V1``) or a checkpoint path; for timm, ``pretrained``
            or a checkpoint path; for a factory, a checkpoint path. A path that exists is always
            read as a checkpoint.
        num_classes: the classifier size, for torchvision and timm models.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ModelSpecError, CheckpointError, MissingDependencyError: with what to do.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ModelSpecError(
            f"model spec {spec!r} is not one of torchvision:NAME, timm:NAME or "
            "module.path:factory (for example torchvision:resnet50 or mypkg.models:build)."
        )
    if kind == "torchvision":
        loaded = _torchvision(spec, rest, weights, num_classes)
    elif kind == "timm":
        loaded = _timm(spec, rest, weights, num_classes)
    else:
        if num_classes is not None:
            raise ModelSpecError(
                "--num-classes applies to torchvision and timm specs; a factory builds its "
                f"own model, so build {spec!r} with the right number of classes."
            )
        loaded = _factory(spec, weights)
    loaded.model.eval()
    return loaded


def _torchvision(spec: str, name: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    models = require("torchvision.models", "torchvision", f"model spec {spec!r}")
    available = list(models.list_models(module=models))
    if name not in available:
        if name in models.list_models():
            raise ModelSpecError(
                f"torchvision model {name!r} is not an image classification model; camkit "
                "explain takes the models of torchvision.models.list_models(module="
                "torchvision.models)."
            )
        hint = did_you_mean(name.lower(), available)
        raise ModelSpecError(
            f"unknown torchvision model {name!r}.{hint} The image classification models are "
            "listed by torchvision.models.list_models(module=torchvision.models)."
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None or _is_path(weights):
        model = models.get_model(name, weights=None, **kwargs)
        if weights is None:
            return LoadedModel(model, spec, random_init=True)
        load_checkpoint(model, weights, spec, num_classes_hint=True)
        return LoadedModel(model, spec, weights=str(weights))
    w = _torchvision_weights(models, spec, name, weights)
    try:
        model = models.get_model(name, weights=w, **kwargs)
    except ValueError as exc:
        raise ModelSpecError(f"{spec} with weights {w}: {_first_line(exc)}") from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the torchvision weights {w} ({w.url}): {type(exc).__name__}: "
            f"{_first_line(exc)}. Check the network connection, or put the file in torch's "
            "cache ($TORCH_HOME/hub/checkpoints), or pass a checkpoint path to --weights."
        ) from exc
    categories = w.meta.get("categories")
    return LoadedModel(
        model,
        spec,
        weights=str(w),
        categories=list(categories) if categories else None,
        preprocess=preprocess_from_torchvision(w),
    )


def _torchvision_weights(models: ModuleType, spec: str, name: str, text: str) -> Any:
    enum = models.get_model_weights(name)
    valid = ["DEFAULT", *(m.name for m in enum)]
    cls, dot, member = text.rpartition(".")
    if dot and cls != enum.__name__:
        raise ModelSpecError(
            f"weights {text!r} are not weights of {spec} ({enum.__name__}); valid names: "
            f"{', '.join(valid)}, or the path of a checkpoint file."
        )
    try:
        return enum[member.upper()]
    except KeyError:
        raise ModelSpecError(
            f"unknown weights {text!r} for {spec}, and no such file; valid names: "
            f"{', '.join(valid)}, or the path of a checkpoint file."
        ) from None


def _timm(spec: str, name: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    timm = require("timm", "timm", f"model spec {spec!r}")
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ModelSpecError(
            f"unknown timm model {name!r}.{hint} List them with timm.list_models()."
        )
    pretrained = weights is not None and weights.lower() in ("pretrained", "default")
    if weights is not None and not pretrained and not _is_path(weights):
        raise CheckpointError(
            f"--weights {weights!r} for {spec}: no such file; pass 'pretrained' for timm's "
            "pretrained weights or the path of a checkpoint file."
        )
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"timm could not build {name!r}{' with pretrained weights' if pretrained else ''}: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    if weights is not None and not pretrained:
        load_checkpoint(model, weights, spec, num_classes_hint=True)
    try:
        data = getattr(timm, "data", None) or importlib.import_module("timm.data")
        config = data.resolve_data_config({}, model=model)
    except Exception:  # an old or unusual timm: the defaults apply
        config = None
    categories = _timm_labels(timm, model) if pretrained else None
    return LoadedModel(
        model,
        spec,
        weights="timm pretrained" if pretrained else weights,
        categories=categories,
        preprocess=preprocess_from_timm(config, name) if config else None,
        random_init=weights is None,
    )


def _timm_labels(timm: ModuleType, model: nn.Module) -> list[str] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names") if isinstance(cfg, Mapping) else None
    if names:
        return [str(n) for n in names]
    try:
        subset = timm.data.infer_imagenet_subset(model)
        if not subset:
            return None
        info = timm.data.ImageNetInfo(subset)
        return [str(info.index_to_description(i)) for i in range(info.num_classes())]
    except Exception:  # labels are a convenience; older timm has no ImageNetInfo
        return None


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(spec: str, module_name: str) -> ModuleType:
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: {path} is not a file.")
        name = f"camkit_user_{path.stem}"
        found = importlib.util.spec_from_file_location(name, path)
        if found is None or found.loader is None:
            raise ModelSpecError(f"model spec {spec!r}: cannot import {path} as a module.")
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module
        try:
            found.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelSpecError(
                f"importing {path} for model spec {spec!r} raised {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ModelSpecError(
                f"model spec {spec!r}: no module named {exc.name!r} in the current directory "
                f"({os.getcwd()}) or the installed packages. Check the spelling, run from the "
                "folder that holds it, or use torchvision:NAME / timm:NAME."
            ) from exc
        raise ModelSpecError(
            f"importing {module_name!r} for model spec {spec!r} failed: {_first_line(exc)}"
        ) from exc
    except Exception as exc:
        raise ModelSpecError(
            f"importing {module_name!r} for model spec {spec!r} raised "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def _factory(spec: str, weights: str | None) -> LoadedModel:
    module_name, _, attr = spec.rpartition(":")
    with _cwd_on_path():
        module = _import(spec, module_name)
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                names = [n for n in dir(module) if not n.startswith("_")]
                hint = did_you_mean(part, names)
                raise ModelSpecError(
                    f"model spec {spec!r}: {module_name} has no attribute {attr!r}.{hint}"
                ) from None
        if not callable(obj):
            raise ModelSpecError(
                f"model spec {spec!r}: {attr} is a {type(obj).__name__}, not a function or "
                "class that builds the model."
            )
        try:
            model = obj()
        except Exception as exc:
            raise ModelSpecError(
                f"model spec {spec!r}: calling {attr}() raised {type(exc).__name__}: "
                f"{_first_line(exc)}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr}() returned a {type(model).__name__}; it must return "
            "a torch.nn.Module."
        )
    if weights is not None:
        load_checkpoint(model, weights, spec)
    return LoadedModel(model, spec, weights=weights)


# -- labels, devices, output folders ---------------------------------------------------------
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


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


@contextmanager
def staged_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder whose files move into ``out`` when the block succeeds.

    The temporary folder sits next to ``out`` (inside it when ``out`` already exists), so the
    final move is a rename on one file system. When the block raises, the temporary folder is
    removed and ``out`` is left as it was (not created when it did not exist). Files already in
    ``out`` with other names are kept; files with the same names are replaced.

    Raises:
        ImageError: ``out`` is a file, or the folder cannot be created.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ImageError(f"the output folder {target} exists and is not a folder.")
    existed = target.is_dir()
    base = target if existed else _existing_ancestor(target.parent)
    tmp = base / f".camkit-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise ImageError(
            f"cannot write the output folder {target}: {exc.strerror or exc} ({base})."
        ) from exc
    try:
        yield tmp
        if existed:
            for f in sorted(tmp.iterdir()):
                os.replace(f, target / f.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
