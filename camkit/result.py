"""The result of one explain call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["CamResult"]


@dataclass(frozen=True)
class CamResult:
    """Maps and what they were made from.

    Attributes:
        maps: ``(N, *input_spatial)`` float32 in [0, 1] (when ``normalize``), on the input's
            device; at layer resolution when ``upsample=None``.
        raw: ``(N, *layer_spatial)`` the combined map after ReLU (signed with ``relu=False``),
            before normalising and upsampling; a dict keyed by layer name for several layers.
        weights: ``(N, C)`` or ``(N, C, *layer_spatial)``; a dict for several layers.
        targets: ``(N,)`` long class indices explained, or ``None`` for other targets.
        scores: ``(N,)`` the target score of each sample.
        layer: the resolved layer name, or a list of names for several layers.
        method: the canonical method name.
        extras: what the method returned beside the map, by name (Deep Feature
            Factorization's ``"concepts"``, for instance: see each method's page); keyed by
            layer name first for several layers. Empty for most methods.
    """

    maps: Tensor
    raw: Tensor | dict[str, Tensor]
    weights: Tensor | dict[str, Tensor]
    targets: Tensor | None
    scores: Tensor
    layer: str | list[str]
    method: str
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.maps.shape[0])
