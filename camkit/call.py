"""One explain call as a value: what every step of the call reads.

:class:`Call` is built once by :meth:`camkit.Explainer.__call__` and handed down to the steps
(the captured forward, the context's capabilities, the replay engine) in place of long lists of
arguments. It is frozen: a step that needs a variant (other inputs, one layer, a built target)
makes one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .inputs import input_spatial
from .method import Method

__all__ = ["Call", "autocast_state"]


def autocast_state(device_type: str) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of autocast contexts restoring the caller's current autocast settings."""
    enabled = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


@dataclass(frozen=True)
class Call:
    """What one explain call works on.

    Attributes:
        model: the (unwrapped) model.
        inputs: the checked batch, the first tensor ``(N, C_in, *S_in)``.
        kwargs: keyword arguments of every model call (the ``model_kwargs`` option).
        layers: the resolved target layers, ``(name, module)``.
        method: the method.
        target: what the caller passed as ``target`` (see :func:`camkit.targets.as_target`),
            or a built :class:`~camkit.targets.Target`.
        options: the resolved options.
        autocast: restores the caller's autocast settings around the model runs that methods
            ask for (``ctx.score``, ``ctx.run_suffix``, ``ctx.recapture``).
    """

    model: nn.Module
    inputs: tuple[Tensor, ...]
    kwargs: dict[str, Any]
    layers: list[tuple[str, nn.Module]]
    method: Method
    target: Any
    options: Mapping[str, Any]
    autocast: Callable[[], AbstractContextManager[Any]] = nullcontext

    @property
    def n(self) -> int:
        """The batch size ``N``."""
        return int(self.inputs[0].shape[0])

    @property
    def spatial(self) -> tuple[int, ...]:
        """The input's spatial size ``S_in`` (:func:`camkit.inputs.input_spatial`)."""
        return input_spatial(self.inputs[0], self.options.get("spatial_dims"))

    @property
    def device(self) -> torch.device:
        """The device of the first input."""
        return self.inputs[0].device
