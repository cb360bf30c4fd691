"""What explaining costs on your model: :func:`cam_cost`, explain time over no-grad inference.

Measured interleaved, as camkit's own benchmarks are: each round runs the explanation and the
plain no-grad inference of the same batch once, back to back, in an order that alternates
between rounds, and takes their ratio; the figure is the median ratio over the rounds. Slow
drifts of the machine (clock, other processes) hit both sides of a round alike, so the ratio
holds on a busy CI runner where absolute times do not::

    from camkit.benchmark import cam_cost

    def test_explaining_stays_cheap():
        assert cam_cost(model, x, method="gradcam", layer="layer4").ratio <= 1.1

Under pytest, the ``cam_cost`` fixture (:mod:`camkit.pytest_plugin`) does the same and records
the figures in pytest-benchmark's ``extra_info`` when the test uses its ``benchmark`` fixture.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .explain import explain

__all__ = ["CamCost", "cam_cost"]


@dataclass(frozen=True)
class CamCost:
    """Explain time over no-grad inference time, per round.

    Attributes:
        ratio: the median over rounds of explain time / inference time.
        q1: first quartile of the per-round ratios.
        q3: third quartile.
        minimum: the smallest per-round ratio.
        maximum: the largest.
        explain_seconds: median explain time.
        inference_seconds: median inference time.
        rounds: rounds measured.
        method: the method explained.
    """

    ratio: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    explain_seconds: float
    inference_seconds: float
    rounds: int
    method: str

    def as_dict(self) -> dict[str, Any]:
        """The figures, for ``extra_info`` or JSON."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.method}: {self.ratio:.3f}x no-grad inference (IQR {self.q1:.3f}-{self.q3:.3f}"
            f", {self.rounds} rounds; {1e3 * self.explain_seconds:.2f} ms vs "
            f"{1e3 * self.inference_seconds:.2f} ms)"
        )


def _synchronizer(x: Any) -> Callable[[], None]:
    first = x[0] if isinstance(x, (tuple, list)) else x
    if isinstance(first, torch.Tensor) and first.device.type == "cuda":
        return lambda: torch.cuda.synchronize(first.device)
    return lambda: None


def cam_cost(
    model: nn.Module,
    x: Any,
    method: str = "gradcam",
    *,
    rounds: int = 15,
    warmup: int = 2,
    timer: Callable[..., Any] | None = None,
    **options: Any,
) -> CamCost:
    """Measure ``camkit.explain(model, x, method=method, **options)`` against ``model(x)``
    under ``torch.no_grad()``, interleaved.

    Args:
        model: the model, in the mode it is explained in (usually ``eval()``).
        x: the batch ``(N, C_in, *S)``, or a tuple of tensors passed as positional inputs.
        method: the method's name.
        rounds: rounds measured; each runs both operations once.
        warmup: untimed calls of each operation first (thread pools, kernel caches, camkit's
            layer search).
        timer: ``benchmark.pedantic`` of pytest-benchmark, to time the explain calls in its
            table too (the fixture passes it); ``None`` times them here only.
        **options: ``layer``, ``target`` and any option of :func:`camkit.explain`.

    Returns:
        The :class:`CamCost`; on CUDA each call is timed between two synchronisations.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0; got {rounds} and {warmup}.")
    inputs = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    sync = _synchronizer(x)

    def run_inference() -> None:
        with torch.no_grad():
            model(*inputs)

    def run_explain() -> None:
        explain(model, x, method=method, **options)

    for _ in range(warmup):
        run_explain()
        run_inference()
    sync()
    times: dict[str, list[float]] = {"explain": [], "inference": []}

    def timed(name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        fn()
        sync()
        times[name].append(time.perf_counter() - t0)

    state = {"round": 0}

    def before() -> None:  # inference first in even rounds
        if state["round"] % 2 == 0:
            timed("inference", run_inference)

    def after() -> None:
        if state["round"] % 2 == 1:
            timed("inference", run_inference)
        state["round"] += 1

    def subject() -> None:
        timed("explain", run_explain)

    if timer is not None:
        timer(subject, setup=before, teardown=after, rounds=rounds, warmup_rounds=0)
    else:
        for _ in range(rounds):
            before()
            subject()
            after()
    done = min(len(times["explain"]), len(times["inference"]))
    ratios = [
        e / i for e, i in zip(times["explain"][:done], times["inference"][:done], strict=True)
    ]
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return CamCost(
        ratio=statistics.median(ratios),
        q1=q1,
        q3=q3,
        minimum=min(ratios),
        maximum=max(ratios),
        explain_seconds=statistics.median(times["explain"][:done]),
        inference_seconds=statistics.median(times["inference"][:done]),
        rounds=done,
        method=method,
    )
