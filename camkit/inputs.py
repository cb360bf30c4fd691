"""Inputs: which axes of the input are spatial, and ``x`` as a mapping of keyword arguments.

**Spatial axes.** An input ``(N, C, *S)`` has the spatial axes ``S`` (maps come back at that
size). An input of two axes ``(N, L)`` has no channel axis: it is a batch of signals, and its
spatial axis is ``L``. The ``spatial_dims`` option overrides the rule: the last ``k`` axes are
spatial (``spatial_dims=2`` for a grayscale batch ``(N, H, W)`` without channel axis).

**Keyword inputs.**
Hugging Face processors return a mapping (``BatchFeature``) and models such as ``CLIPModel``
take the image as ``pixel_values=``, not as their first positional argument. camkit accepts
such a mapping as ``x``:

- the image is the entry named by the ``image_key`` option, by default the first of
  :data:`IMAGE_KEYS` present; maps take its spatial size;
- tensors with one row per image and the image's spatial size (a ``pixel_mask`` ``(N, H, W)``)
  go with the image's rows wherever a method re-scores copies of samples;
- every other entry (``input_ids`` of texts, flags) is passed unchanged to every forward.

The model is then called through :class:`KeywordModel`, which passes those tensors by name;
layers keep the model's own names.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .errors import CamkitWarning, InputError, user_stacklevel

__all__ = ["IMAGE_KEYS", "KeywordModel", "input_spatial", "split_mapping", "to_input_rank"]

#: Keys tried, in order, for the image of a mapping input when ``image_key`` is not given.
IMAGE_KEYS = ("pixel_values", "images", "x")


def input_spatial(first: Tensor, spatial_dims: int | None = None) -> tuple[int, ...]:
    """The spatial size of the input ``first`` (see the module docstring).

    Raises:
        InputError: when ``spatial_dims`` leaves no batch axis.
    """
    if spatial_dims is None:
        return tuple(first.shape[1:]) if first.ndim == 2 else tuple(first.shape[2:])
    if spatial_dims >= first.ndim:
        raise InputError(
            f"spatial_dims={spatial_dims} for an input of shape {tuple(first.shape)}: expected "
            f"at most {first.ndim - 1} (the batch axis first); pass fewer spatial axes."
        )
    return tuple(first.shape[first.ndim - spatial_dims :])


class KeywordModel(nn.Module):
    """Calls ``model`` with positional tensors passed by the names ``keys``.

    ``model`` is a submodule, so ``modules()`` and ``buffers()`` see it; layer names are
    resolved on ``model`` itself.
    """

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, *tensors: Tensor, **kwargs: Any) -> Any:
        return self.model(**dict(zip(self.keys, tensors, strict=True)), **kwargs)


def split_mapping(
    x: Mapping[str, Any], image_key: str | None
) -> tuple[tuple[str, ...], tuple[Any, ...], dict[str, Any]]:
    """The keys and values of the inputs (image first, then the tensors that follow its rows)
    and the keyword arguments passed unchanged.

    Raises:
        InputError: when the image key is missing or not a tensor.
    """
    keys = list(x)
    if image_key is None:
        found = [k for k in IMAGE_KEYS if k in x]
        if not found:
            raise InputError(
                f"x is a mapping with keys {keys}, none of which is an image key camkit knows "
                f"({', '.join(IMAGE_KEYS)}). Pass image_key=... naming the image's entry."
            )
        image_key = found[0]
    if image_key not in x:
        raise InputError(
            f"image_key={image_key!r} is not a key of x; its keys are {keys}. Pass the key of "
            "the image's entry."
        )
    image = x[image_key]
    if not isinstance(image, Tensor) or image.ndim < 2:
        raise InputError(
            f"x[{image_key!r}] expects an image batch tensor (N, C, *S); got "
            f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}."
        )
    n, spatial = image.shape[0], tuple(image.shape[2:])
    follow = [
        k
        for k, v in x.items()
        if k != image_key
        and isinstance(v, Tensor)
        and v.ndim >= 1
        and v.shape[0] == n
        and spatial
        and tuple(v.shape[-len(spatial) :]) == spatial
    ]
    names = (image_key, *follow)
    rest = {k: v for k, v in x.items() if k not in names}
    return names, tuple(x[k] for k in names), rest


def to_input_rank(name: str, m: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """A map ``(N, *S)`` whose spatial rank is not the input's: its size-1 axes dropped when
    that leaves the input's rank (a signal model's ``(N, L', 1)`` map for ``(N, L)`` inputs),
    else as it is, with a warning that it stays at the layer's size."""
    kept = [d for d in m.shape[1:] if d != 1]
    if len(kept) == len(spatial):
        return m.reshape(m.shape[0], *kept)
    warnings.warn(
        f"the map of layer {name!r}, {tuple(m.shape[1:])}, has not the input's spatial rank "
        f"{spatial}: it stays at the layer's size, not upsampled. Pass spatial_dims=... (the "
        "number of trailing spatial axes of the input) or reshape=..., or choose another layer.",
        CamkitWarning,
        stacklevel=user_stacklevel(),
    )
    return m
