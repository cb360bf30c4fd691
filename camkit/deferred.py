"""Finiteness checks that do not stop an accelerator at every step of a call.

Reading a value computed on a GPU (``bool(t)``, ``t.item()``) makes the host wait until the
device has finished everything queued so far; afterwards the device idles while the host
issues the next operations. A call that checked its activations, scores, gradients, weights
and combined map one by one waited five times after the forward and left the GPU idle for the
whole of camkit's own host-side work: Grad-CAM on resnet50 at batch 64 took 1.45 times no-grad
inference on an H200, although the device work was only 4% more (docs/benchmarks.md, GPU).

Inside :func:`deferred_checks`, :func:`require_finite` on a device other than the CPU only
queues a flag computed on the device (whether the tensor's sum is finite); :func:`resolve`
reads every queued flag in one transfer and raises the error of the first check that fails,
in the order the checks were made, so a call raises the same error as with immediate checks.
camkit resolves before any step that runs the model again (``ctx.score``, ``ctx.run_suffix``,
``ctx.recapture``) and once before the blank-map warnings, which read the map anyway. On the
CPU, where reading a value costs nothing extra, every check is immediate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

__all__ = [
    "deferred_checks",
    "is_finite",
    "require",
    "require_finite",
    "resolve",
    "resolving",
]

#: defer on the CPU too (tests exercise the deferred path without a GPU)
DEFER_ON_CPU = False

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class _Pending:
    ok: Tensor  # 0-dim bool on the device: the check passes (for finiteness: the sum is finite)
    confirm: Callable[[], bool] | None  # a second look when ``ok`` is false
    error: Callable[[], Exception]


_PENDING: ContextVar[list[_Pending] | None] = ContextVar("camkit_pending_checks", default=None)


def is_finite(t: Tensor) -> bool:
    """Every element of ``t`` is finite (one host read unless the sum overflows)."""
    # the sum is non-finite whenever an element is (or it overflows): the full check then
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def require_finite(t: Tensor, error: Callable[[], Exception]) -> None:
    """Raise ``error()`` unless every element of ``t`` is finite: at once on the CPU or
    outside :func:`deferred_checks`, else at the next :func:`resolve`."""
    pending = _PENDING.get()
    if pending is None or (t.device.type == "cpu" and not DEFER_ON_CPU):
        if not is_finite(t):
            raise error()
        return
    with torch.no_grad():
        t = t.detach()
        pending.append(
            _Pending(torch.isfinite(t.sum()), lambda: bool(torch.isfinite(t).all()), error)
        )


def require(ok: Tensor, error: Callable[[], Exception]) -> bool:
    """Raise ``error()`` unless the 0-dim bool ``ok`` is true: at once on the CPU or outside
    :func:`deferred_checks` (returns ``True``), else at the next :func:`resolve` (returns
    ``False``: the caller must keep what it does until then safe for a failing check)."""
    pending = _PENDING.get()
    if pending is None or (ok.device.type == "cpu" and not DEFER_ON_CPU):
        if not bool(ok):
            raise error()
        return True
    pending.append(_Pending(ok.detach(), None, error))
    return False


def resolve() -> None:
    """Read every queued check in one transfer; raise the first failing check's error."""
    pending = _PENDING.get()
    if not pending:
        return
    checks = list(pending)
    pending.clear()
    device = checks[0].ok.device
    flags = torch.stack([c.ok.to(device) for c in checks]).tolist()
    for ok, check in zip(flags, checks, strict=True):
        if not ok and (check.confirm is None or not check.confirm()):
            raise check.error()


def resolving(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` that first resolves the queued checks (for steps that run the model again)."""

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        resolve()
        return fn(*args, **kwargs)

    return run


@contextmanager
def deferred_checks() -> Iterator[None]:
    """Queue :func:`require_finite` checks off the CPU until :func:`resolve` or the end of the
    block. An exception inside the block is preceded by any queued check that fails: the
    caller gets the error an immediate check would have raised first."""
    token = _PENDING.set([])
    try:
        yield
        resolve()
    except Exception as exc:
        try:
            resolve()
        except Exception as earlier:
            if earlier is exc:
                raise
            raise earlier from exc
        raise
    finally:
        _PENDING.reset(token)
