"""The options every method accepts, and the checks applied to them.

One table, documented once (``docs/options.md``). A method adds its own options through
``Method.options``; any other keyword is an :class:`~camkit.errors.OptionError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .errors import OptionError, did_you_mean

__all__ = ["AUGMENTATIONS", "COMMON_OPTIONS", "UPSAMPLE_MODES", "resolve_options"]

#: Options shared by every method, with their defaults.
COMMON_OPTIONS: Mapping[str, Any] = {
    "relu": True,
    "normalize": True,
    "upsample": "auto",
    "batch_size": "auto",
    "progress": None,
    "seed": 0,
    "aug_smooth": False,
    "eigen_smooth": False,
    "reshape": None,
    "output": None,
    "model_kwargs": None,
    "differentiable": False,
    "image_key": None,
    "spatial_dims": None,
}

#: Test-time augmentations ``aug_smooth`` can name; ``True`` means all of them.
AUGMENTATIONS = ("hflip", "scale")

#: Interpolation modes ``upsample`` accepts besides ``"auto"`` and ``None``.
UPSAMPLE_MODES = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear", "area")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise OptionError(
            f"option {name!r} expects True or False, got {value!r} ({type(value).__name__})."
        )


def _check_common(opts: Mapping[str, Any]) -> None:
    for name in ("relu", "normalize", "eigen_smooth", "differentiable"):
        _check_bool(name, opts[name])
    aug = opts["aug_smooth"]
    if not isinstance(aug, bool) and not (
        isinstance(aug, (tuple, list)) and aug and all(a in AUGMENTATIONS for a in aug)
    ):
        raise OptionError(
            "option 'aug_smooth' expects True, False or a non-empty sequence of "
            f"{', '.join(map(repr, AUGMENTATIONS))}; got {aug!r}."
        )
    up = opts["upsample"]
    if up is not None and up != "auto" and up not in UPSAMPLE_MODES:
        raise OptionError(
            f"option 'upsample' expects 'auto', None or one of {', '.join(UPSAMPLE_MODES)}; "
            f"got {up!r}."
        )
    bs = opts["batch_size"]
    if bs != "auto" and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
        raise OptionError(
            f"option 'batch_size' expects 'auto' or a positive int (rows per re-run of the "
            f"model), got {bs!r}."
        )
    seed = opts["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
        raise OptionError(
            f"option 'seed' expects an int from -2**63 to 2**64 - 1 (what torch.Generator "
            f"takes), got {seed!r}."
        )
    if opts["progress"] is not None:
        _check_bool("progress", opts["progress"])
    reshape = opts["reshape"]
    if reshape is not None and not callable(reshape):
        raise OptionError(
            f"option 'reshape' expects a callable turning an activation into (N, C, *S), "
            f"got {type(reshape).__name__}."
        )
    kwargs = opts["model_kwargs"]
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise OptionError(
            f"option 'model_kwargs' expects a mapping of keyword arguments for the model, "
            f"got {type(kwargs).__name__}."
        )
    dims = opts["spatial_dims"]
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise OptionError(
            "option 'spatial_dims' expects the number of trailing spatial axes of the input, "
            f"an int >= 1, or None; got {dims!r}."
        )
    key = opts["image_key"]
    if key is not None and not isinstance(key, str):
        raise OptionError(
            "option 'image_key' expects the key of the image in a mapping input x, a str; "
            f"got {type(key).__name__}."
        )
    out = opts["output"]
    if out is not None and not isinstance(out, (int, str)) and not callable(out):
        raise OptionError(
            "option 'output' expects an index, a key or a callable choosing the model output "
            f"to score; got {type(out).__name__}."
        )


def resolve_options(
    method_name: str,
    method_options: Mapping[str, Any],
    given: Mapping[str, Any],
    check_method_options: Callable[[Mapping[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Merge defaults with ``given``; reject unknown names and ill-typed common values.

    Args:
        method_name: canonical method name, for messages.
        method_options: the method's own options with defaults.
        given: the keywords the caller passed.
        check_method_options: the method's validator for its own options, if any.

    Returns:
        A new dict holding every option (common and the method's) with its value.
    """
    valid = {**COMMON_OPTIONS, **method_options}
    unknown = [k for k in given if k not in valid]
    if unknown:
        hint = did_you_mean(unknown[0], valid)
        raise OptionError(
            f"unknown option {unknown[0]!r} for method {method_name!r}.{hint} "
            f"Valid options: {', '.join(sorted(valid))}."
        )
    opts = {**valid, **given}
    _check_common(opts)
    if check_method_options is not None:
        check_method_options(opts)
    return opts
