"""Conformance checks for method plugins: ``check_method(method)``.

Third-party authors call it in their test suites; camkit's built-ins pass it in camkit's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from .errors import BlankMapWarning, CamkitError
from .explain import Explainer
from .method import Method
from .registry import Registry, default_registry, set_default_registry
from .toy import TinyCNN

__all__ = ["check_method", "fresh_registry"]


class fresh_registry:  # noqa: N801 - used like a function: `with fresh_registry() as reg:`
    """Swap in a new registry for the duration of a ``with`` block (for tests).

    Args:
        load_entrypoints: load entry-point plugins into it (camkit's built-ins included).
    """

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.registry = Registry(load_entrypoints=load_entrypoints)
        self._old: Registry | None = None

    def __enter__(self) -> Registry:
        self._old = set_default_registry(self.registry)
        return self.registry

    def __exit__(self, *exc: Any) -> None:
        set_default_registry(self._old)


class _CheckNet(TinyCNN):
    """TinyCNN whose head (1x1 conv, ReLU, global max-pool, linear) makes the gradient at
    ``features`` vary across positions and inputs, so batch-dependence shows."""

    def __init__(self, dims: int) -> None:
        super().__init__(dims=dims, seed=dims)
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
        pool = {
            1: torch.nn.AdaptiveMaxPool1d,
            2: torch.nn.AdaptiveMaxPool2d,
            3: torch.nn.AdaptiveMaxPool3d,
        }[dims]
        gen = torch.Generator().manual_seed(10 + dims)
        mix = conv(16, 16, 1)
        with torch.no_grad():
            for p in mix.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.head = torch.nn.Sequential(
            mix, torch.nn.ReLU(), pool(1), torch.nn.Flatten(), self.head[2]
        )


def _fail(method: Method, what: str) -> AssertionError:
    return AssertionError(f"method {method.name!r} ({type(method).__name__}): {what}")


def _check_attributes(method: Method) -> None:
    for attr, kind in (("name", str), ("citation", str), ("cost", str)):
        value = getattr(method, attr)
        if not isinstance(value, kind) or not value:
            raise _fail(method, f"attribute {attr!r} must be a non-empty {kind.__name__}")
    for attr in (
        "needs_gradients",
        "needs_hessian_vector",
        "needs_input_gradient",
        "uses_run_suffix",
        "class_discriminative",
        "differentiable",
    ):
        if not isinstance(getattr(method, attr), bool):
            raise _fail(method, f"attribute {attr!r} must be a bool")
    if not isinstance(method.aliases, tuple):
        raise _fail(method, "attribute 'aliases' must be a tuple of names")
    if not isinstance(method.options, dict):
        raise _fail(method, "attribute 'options' must be a dict of defaults")


def check_method(
    method: Method | str,
    model_factory: Callable[[int], torch.nn.Module] | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> None:
    """Run the conformance checks every camkit method passes; raise ``AssertionError`` if not.

    Checks: attributes; on 1D, 2D and 3D inputs, weights of shape ``(N, C)`` or ``(N, C, *S)``
    on the activations' device, floating, finite; maps ``(N, *S_in)`` float32 in [0, 1] on the
    input's device; each sample gets the map it gets alone (batch independence), within a
    relative 1e-4; the same seed gives the same maps. A map the check models give blank is the
    model's doing, not the method's: its :class:`~camkit.BlankMapWarning` is not shown.

    Args:
        method: an instance or a registered name.
        model_factory: ``dims -> model`` for ``(N, 3, *S)`` inputs, with a layer named
            ``features`` giving 16 channels at half the input size (rounded up) and at least 3
            classes. The default is a :class:`~camkit.toy.TinyCNN` with a non-linear head, so
            gradients vary across positions; methods that need a particular head (CAM needs
            global average pooling and a linear layer) pass ``TinyCNN`` itself.
        device: where to run.
        **options: options for the method.
    """
    m = default_registry().get(method) if isinstance(method, str) else method
    _check_attributes(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlankMapWarning)
        _check_maps(m, model_factory, device, options)


def _check_maps(
    m: Method,
    model_factory: Callable[[int], torch.nn.Module] | None,
    device: str | torch.device,
    options: dict[str, Any],
) -> None:
    make = model_factory or _CheckNet
    gen = torch.Generator().manual_seed(1)
    sizes = {1: (32,), 2: (12, 16), 3: (6, 8, 8)}
    for dims, spatial in sizes.items():
        model = make(dims).to(device).eval()
        x = torch.randn((3, 3, *spatial), generator=gen).to(device)
        targets = [0, 1, 2]
        try:
            ex = Explainer(model, layer="features", method=m, **options)
            res = ex(x, target=targets)
        except CamkitError as exc:
            raise _fail(m, f"raised on a {dims}D input: {exc}") from exc
        w = res.weights
        assert not isinstance(w, dict)
        acts_shape = (3, 16, *(-(-s // 2) for s in spatial))
        if tuple(w.shape) not in ((3, 16), acts_shape):
            raise _fail(
                m,
                f"weights of shape {tuple(w.shape)} on a {dims}D input; expected "
                f"(3, 16) or {acts_shape}",
            )
        if not w.is_floating_point() or not bool(torch.isfinite(w).all()):
            raise _fail(m, "weights must be finite floating-point values")
        if w.device != x.device or res.maps.device != x.device:
            raise _fail(m, f"weights/maps on {w.device}/{res.maps.device}, inputs on {x.device}")
        if res.maps.shape != (3, *spatial) or res.maps.dtype != torch.float32:
            raise _fail(
                m,
                f"maps {tuple(res.maps.shape)} {res.maps.dtype}; expected {(3, *spatial)} float32",
            )
        if (
            bool((res.maps < 0).any())
            or bool((res.maps > 1).any())
            or not bool(torch.isfinite(res.maps).all())
        ):
            raise _fail(m, "maps must lie in [0, 1]")
        raw = res.raw
        assert not isinstance(raw, dict)
        for i in range(3):
            alone = ex(x[i : i + 1], target=[targets[i]]).raw
            assert not isinstance(alone, dict)
            scale = float(raw[i].abs().max()) + 1e-12
            if float((alone[0] - raw[i]).abs().max()) > 1e-4 * scale + 1e-7:
                raise _fail(
                    m, f"sample {i} gets a different map in a batch than alone (batch independence)"
                )
        again = ex(x, target=targets)
        if not torch.equal(again.maps, res.maps):
            raise _fail(m, "two calls with the same seed give different maps")
