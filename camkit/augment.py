"""``aug_smooth``: test-time augmentation, as batched copies mapped back and averaged.

:func:`camkit.explain` drives it: the plain call on the inputs (the identity, which fixes the
classes explained: for ``target=None``, those predicted on the original inputs), then one
batched call on the other copies (:func:`augmented_inputs`, :func:`copies_target`: horizontal
flip; intensities x0.9 and x1.1), then :func:`average`: flipped maps, raw maps and element-wise
weights are flipped back before averaging, and the mean map is normalised again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import cam
from .errors import OptionError
from .result import CamResult
from .targets import Target, as_target

__all__ = ["AUG_FACTORS", "augmentations", "augmented_inputs", "average", "copies_target"]

#: Intensity factors of the ``scale`` augmentation (the identity, 1.0, is always included).
AUG_FACTORS = (0.9, 1.1)


def augmentations(spec: Any, first: Tensor) -> list[tuple[bool, float]]:
    """``(flip, factor)`` pairs for ``aug_smooth``, the identity first."""
    names = ("hflip", "scale") if spec is True else tuple(spec)
    if "hflip" in names and first.ndim < 4:
        raise OptionError(
            "aug_smooth's 'hflip' flips the last spatial dimension of images (N, C, H, W, ...); "
            f"the input has shape {tuple(first.shape)}. Pass aug_smooth=('scale',) instead."
        )
    if "scale" in names and not first.is_floating_point():
        raise OptionError(
            "aug_smooth's 'scale' multiplies the input's values, which needs floating-point "
            f"inputs; got {first.dtype} (token ids?). Pass aug_smooth=('hflip',) or leave it off."
        )
    flips = (False, True) if "hflip" in names else (False,)
    factors = (1.0, *AUG_FACTORS) if "scale" in names else (1.0,)
    return [(f, s) for f in flips for s in factors]


class _IndexedTarget:
    """A target scoring copies: row ``m`` of a copy batch belongs to sample ``index[m]``."""

    def __init__(self, target: Target, index: Tensor) -> None:
        self.target, self.index = target, index

    def scores(self, output: Any, index: Tensor) -> Tensor:
        return self.target.scores(output, self.index.to(index.device)[index])


def augmented_inputs(
    inputs: tuple[Tensor, ...], augs: list[tuple[bool, float]]
) -> tuple[tuple[Tensor, ...], Tensor]:
    """The copies of every augmentation but the identity (the first), as one batch
    ``(K * N, ...)`` (augmentation-major), and the sample of each row ``(K * N,)``. Further
    input tensors are repeated unchanged."""
    n, k = int(inputs[0].shape[0]), len(augs) - 1
    index = torch.arange(n, device=inputs[0].device).repeat(k)
    copies = torch.cat(
        [(inputs[0].flip(-1) if flip else inputs[0]) * factor for flip, factor in augs[1:]]
    )
    return (copies, *(t[index] for t in inputs[1:])), index


def copies_target(classes: Tensor | None, spec: Any, index: Tensor, n: int) -> Any:
    """The target of the copies: the classes the identity explained, per row, or the caller's
    target scoring each row as its sample (``index``)."""
    if classes is not None:
        return classes[index]
    return _IndexedTarget(as_target(spec, None, n)[0], index)


def average(
    base: CamResult, res: CamResult, augs: list[tuple[bool, float]], normalize: bool
) -> CamResult:
    """The mean of the identity's result ``base`` and the copies' ``res``, each mapped back."""
    n, k = int(base.maps.shape[0]), len(augs) - 1
    flips = torch.tensor([flip for flip, _ in augs[1:]], device=res.maps.device)
    flips = flips.repeat_interleave(n)

    def back(t: Tensor, spatial_from: int) -> Tensor:
        """Un-flip the flipped copies of ``t`` ``(k*n, ...)`` and split them ``(k, n, ...)``."""
        if t.ndim > spatial_from:
            shape = (-1,) + (1,) * (t.ndim - 1)
            t = torch.where(flips.reshape(shape), t.flip(-1), t)
        return t.reshape(k, n, *t.shape[1:])

    def mean(identity: Tensor, copies_t: Tensor, spatial_from: int) -> Tensor:
        return torch.cat([identity.unsqueeze(0), back(copies_t, spatial_from)]).mean(0)

    maps = mean(base.maps, res.maps, 1)
    if normalize:
        maps = cam.normalize(maps)

    def merge(a: Tensor | dict[str, Tensor], b: Tensor | dict[str, Tensor], sp: int) -> Any:
        if isinstance(a, dict):
            assert isinstance(b, dict)
            return {name: mean(a[name], b[name], sp) for name in a}
        assert isinstance(b, Tensor)
        return mean(a, b, sp)

    return CamResult(
        maps=maps.float(),
        raw=merge(base.raw, res.raw, 1),
        weights=merge(base.weights, res.weights, 2),
        targets=base.targets,
        scores=base.scores,
        layer=base.layer,
        method=base.method,
        extras=base.extras,  # those of the original inputs
    )
