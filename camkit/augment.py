"""``aug_smooth``: test-time augmentation, as batched copies mapped back and averaged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import cam
from .errors import OptionError
from .method import Method
from .result import CamResult
from .targets import Target, as_target

#: Intensity factors of the ``scale`` augmentation (the identity, 1.0, is always included).
AUG_FACTORS = (0.9, 1.1)


def _augmentations(spec: Any, first: Tensor) -> list[tuple[bool, float]]:
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


def _run_augmented(
    model: nn.Module,
    inputs: tuple[Tensor, ...],
    kwargs: dict[str, Any],
    layers: list[tuple[str, nn.Module]],
    method: Method,
    target_spec: Any,
    opts: Mapping[str, Any],
) -> CamResult:
    """``aug_smooth``: the mean of the maps of augmented copies, each mapped back.

    The identity runs first and fixes the classes explained (for ``target=None``, those predicted
    on the original inputs); the other copies (horizontal flip; intensities x0.9 and x1.1) run as
    one batched call. Flipped maps, raw maps and element-wise weights are flipped back before
    averaging; the mean map is normalised again.
    """
    from .explain import _run  # the plain call, for the identity and the copies

    augs = _augmentations(opts["aug_smooth"], inputs[0])
    plain = {**opts, "aug_smooth": False}
    base = _run(model, inputs, kwargs, layers, method, target_spec, plain)
    if len(augs) == 1:
        return base
    n, k = int(inputs[0].shape[0]), len(augs) - 1
    index = torch.arange(n, device=inputs[0].device).repeat(k)
    copies = torch.cat(
        [(inputs[0].flip(-1) if flip else inputs[0]) * factor for flip, factor in augs[1:]]
    )
    target: Any
    if base.targets is not None:
        target = base.targets[index]
    else:
        target = _IndexedTarget(as_target(target_spec, None, n)[0], index)
    extra = tuple(t[index] for t in inputs[1:])
    res = _run(model, (copies, *extra), kwargs, layers, method, target, plain)
    flips = torch.tensor([flip for flip, _ in augs[1:]], device=copies.device).repeat_interleave(n)

    def back(t: Tensor, spatial_from: int) -> Tensor:
        """Un-flip the flipped copies of ``t`` ``(k*n, ...)`` and split them ``(k, n, ...)``."""
        if t.ndim > spatial_from:
            shape = (-1,) + (1,) * (t.ndim - 1)
            t = torch.where(flips.reshape(shape), t.flip(-1), t)
        return t.reshape(k, n, *t.shape[1:])

    def mean(identity: Tensor, copies_t: Tensor, spatial_from: int) -> Tensor:
        return torch.cat([identity.unsqueeze(0), back(copies_t, spatial_from)]).mean(0)

    maps = mean(base.maps, res.maps, 1)
    if opts["normalize"]:
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
    )
