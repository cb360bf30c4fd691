"""Capturing a layer's activations (and gradients) during one call.

A :class:`Capture` puts forward hooks on the target layers for one call and takes them off in
``__exit__`` whatever happened. Its hooks act only on forwards run by the thread (strictly: the
``contextvars`` context) that opened it, so two threads explaining one model at the same time do
not see each other's hooks.

When gradients are needed, no autograd graph is built before the earliest target layer: the
forward starts with grad mode off; in the first target's hook the activation becomes a fresh
leaf that requires grad and grad mode is switched on for the rest of the forward (grad mode is
per thread). Every hook hands a clone of the activation to the rest of the model, so in-place
operations downstream (``out += identity``, ``ReLU(inplace=True)``) cannot alter what was
captured. The caller's grad mode is restored on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import LayerError, ModelError

__all__ = ["Capture", "hooks_paused", "is_compiled", "output_replaced", "refuse_compiled"]

_ACTIVE: ContextVar[Capture | None] = ContextVar("camkit_active_capture", default=None)
_REPLACING: ContextVar[object | None] = ContextVar("camkit_replacing", default=None)


def is_compiled(module: nn.Module) -> bool:
    """``module`` is a TorchScript module (``torch.jit.script`` or ``torch.jit.trace``): its
    forward runs as a compiled graph that Python hooks and functions cannot see into."""
    return isinstance(module, torch.jit.ScriptModule)


def refuse_compiled(module: nn.Module, what: str, name: str = "") -> None:
    """Raise :class:`ModelError` when ``module`` is a TorchScript module.

    Args:
        module: the model, or a target layer of it.
        what: what needs to see inside it (``"camkit"``, ``"guided backpropagation"``).
        name: the layer's dotted name, when ``module`` is a layer.
    """
    if not is_compiled(module):
        return
    which = f"layer {name!r} ({type(module).__name__})" if name else type(module).__name__
    raise ModelError(
        f"{which} is a TorchScript module (torch.jit.script or torch.jit.trace): {what} "
        "cannot see inside compiled graphs, whose modules run without Python hooks. Pass the "
        "eager nn.Module the compiled one was made from (torch.compile models are fine)."
    )


class Capture:
    """Forward hooks recording the outputs of ``layers`` for the forwards of this context.

    Args:
        layers: ``(name, module)`` pairs to record.
        needs_gradients: build the autograd graph from the earliest target layer on, so that
            a score can be differentiated with respect to the activations.
        transform: the model's input transform, when it resizes and pads its inputs
            (torchvision's detection models): its output's geometry is recorded.
        replace: without gradients, ``replace(output)`` is what the rest of the model sees in
            place of a layer's output (a new tensor); by default a clone of it.
        from_input: keep grad mode on from the start of the forward (the caller passes inputs
            that require grad), so the graph runs from the input through every layer.

    After a forward, ``activations[name]`` holds each layer's output: a tensor in the graph
    when gradients are needed, a detached one otherwise.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, nn.Module]],
        needs_gradients: bool,
        transform: nn.Module | None = None,
        replace: Callable[[Tensor], Tensor] | None = None,
        from_input: bool = False,
        differentiable: bool = False,
    ) -> None:
        self.layers = list(layers)
        self.from_input = from_input
        self.replace = replace
        self.transform = transform
        self.needs_gradients = needs_gradients
        self.differentiable = differentiable
        self.activations: dict[str, Tensor] = {}
        #: ``(canvas, sizes)`` when the model resizes its inputs internally (torchvision's
        #: detection ``transform``): the padded batch size and each image's resized size
        self.geometry: tuple[tuple[int, int], list[tuple[int, int]]] | None = None
        self._handles: list[RemovableHandle] = []
        self._token: Any = None
        self._grad_mode = True

    def __enter__(self) -> Capture:
        self._grad_mode = torch.is_grad_enabled()
        for name, module in self.layers:
            refuse_compiled(module, "camkit", name)
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._hook(name)))
            if self.transform is not None:
                self._handles.append(self.transform.register_forward_hook(self._geometry_hook))
            self._token = _ACTIVE.set(self)
            # the graph from the inputs on: for input gradients, and for differentiable maps
            torch.set_grad_enabled(self.from_input or self.differentiable)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None
        torch.set_grad_enabled(self._grad_mode)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if _ACTIVE.get() is not self:
                return None  # another call's forward, or an inner forward of a method
            if name in self.activations:
                raise LayerError(
                    f"layer {name!r} ({type(module).__name__}) runs more than once per forward "
                    "(a module shared between places in the model), so its activation is "
                    "ambiguous. Choose a module that runs once; camkit.layers(model, x) shows "
                    "the call count of each."
                )
            if not isinstance(output, Tensor):
                raise LayerError(
                    f"layer {name!r} ({type(module).__name__}) returns "
                    f"{type(output).__name__}, not a tensor. Choose a layer whose output is a "
                    "tensor (N, C, *S), for example one of its submodules."
                )
            if self.differentiable:
                # the activation stays in the graph of the whole forward (a layer that nothing
                # before it differentiates through starts the graph, as below)
                if self.needs_gradients and not output.requires_grad:
                    output = output.detach().requires_grad_(True)
                self.activations[name] = output
                return output.clone()
            if not self.needs_gradients:
                self.activations[name] = output.detach()
                return output.clone() if self.replace is None else self.replace(output.detach())
            if not output.requires_grad:
                # the earliest target (or one on a branch no earlier target feeds): start
                # the graph here
                output = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
            self.activations[name] = output
            return output.clone()

        return hook

    def _geometry_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if _ACTIVE.get() is not self:
            return
        images = output[0] if isinstance(output, tuple) and output else output
        tensors = getattr(images, "tensors", None)
        sizes = getattr(images, "image_sizes", None)
        if isinstance(tensors, Tensor) and sizes is not None:
            canvas = (int(tensors.shape[-2]), int(tensors.shape[-1]))
            self.geometry = (canvas, [(int(h), int(w)) for h, w in sizes])

    def missing(self) -> list[str]:
        """Names of target layers that did not run in the forward."""
        return [name for name, _ in self.layers if name not in self.activations]


@contextmanager
def hooks_paused() -> Iterator[None]:
    """Switch off the hooks of the current capture, for forwards a method runs itself."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextmanager
def output_replaced(module: nn.Module, value: Tensor) -> Iterator[None]:
    """Within this block, forwards of this thread see ``value`` as ``module``'s output."""
    owner = object()
    token = _REPLACING.set(owner)

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        if _REPLACING.get() is not owner:
            return None
        # a copy: later in-place operations must not write into the caller's tensor
        dtype = output.dtype if isinstance(output, Tensor) else value.dtype
        return value.to(dtype=dtype, copy=True)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        _REPLACING.reset(token)
