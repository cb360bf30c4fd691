"""Keyword inputs: ``x`` as a mapping of the model's keyword arguments.

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

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .errors import InputError

__all__ = ["IMAGE_KEYS", "KeywordModel", "split_mapping"]

#: Keys tried, in order, for the image of a mapping input when ``image_key`` is not given.
IMAGE_KEYS = ("pixel_values", "images", "x")


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
