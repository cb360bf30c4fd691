"""pytest plugin (entry point ``pytest11``): the ``cam_cost`` fixture for your own CI.

pytest loads this module when camkit is installed; ``import camkit`` never imports it, so
pytest stays optional. camkit and torch are imported when a test asks for the fixture, not when
pytest starts::

    def test_gradcam_costs_about_inference(cam_cost):
        model, x = build_model().eval(), example_batch()
        assert cam_cost(model, x, method="gradcam", layer="layer4").ratio <= 1.1

``cam_cost(model, x, method="gradcam", **options)`` measures as :func:`camkit.benchmark.cam_cost`
(explain over no-grad inference, interleaved; median ratio over rounds). When the test also uses
pytest-benchmark's ``benchmark`` fixture, the explain calls are timed through it (they appear in
its table) and the figures go to ``benchmark.extra_info["cam_cost"]``, so ``--benchmark-json``
stores the ratio; pytest-benchmark allows one such measurement per test. Without it, the figures
go to the test's ``user_properties`` (``--junitxml`` records them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .benchmark import CamCost

__all__ = ["cam_cost"]


@pytest.fixture
def cam_cost(request: pytest.FixtureRequest) -> Callable[..., CamCost]:
    """``cam_cost(model, x, method="gradcam", **options) -> CamCost``: explain time over
    no-grad inference time on your model and batch, measured interleaved; ``.ratio`` is the
    median over rounds."""
    from .benchmark import cam_cost as measure

    benchmark: Any = None
    if "benchmark" in request.fixturenames:
        benchmark = request.getfixturevalue("benchmark")

    def run(model: Any, x: Any, method: str = "gradcam", **options: Any) -> CamCost:
        timer = None if benchmark is None else benchmark.pedantic
        cost = measure(model, x, method, timer=timer, **options)
        figures = cost.as_dict()
        if benchmark is not None:
            benchmark.extra_info["cam_cost"] = figures
        request.node.user_properties.append(("cam_cost", figures))
        return cost

    return run
