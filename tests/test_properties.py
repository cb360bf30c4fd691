"""Property-based tests: random small architectures, batch sizes, input sizes, dtypes, targets.

For every drawn case: maps have the input's spatial shape and lie in [0, 1]; a blank map comes
with a :class:`camkit.CamkitWarning`; a batch's maps equal its samples explained one at a time;
results do not depend on ``batch_size``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import camkit

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given, settings, HealthCheck = hypothesis.given, hypothesis.settings, hypothesis.HealthCheck

#: one-pass methods and the ones that run the model again (kept small: C <= 6 channels)
METHODS = [
    "ablationcam",
    "cam",
    "eigencam",
    "eigengradcam",
    "gradcam",
    "gradcam-elementwise",
    "gradcampp",
    "hirescam",
    "iscam",
    "layercam",
    "scorecam",
    "smoothgradcampp",
    "sscam",
    "xgradcam",
]
OPTIONS: dict[str, dict[str, Any]] = {
    "iscam": {"n_samples": 2},
    "sscam": {"n_samples": 2},
    "smoothgradcampp": {"n_samples": 2},
}
SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Arch:
    dims: int
    in_channels: int
    widths: tuple[int, ...]
    kernels: tuple[int, ...]
    strides: tuple[int, ...]
    activation: str
    batch_norm: bool
    classes: int
    seed: int


class Net(nn.Module):
    """conv blocks (the last one is ``layer``) -> global average pool -> linear."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[arch.dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[arch.dims]
        act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[arch.activation]
        blocks: list[nn.Module] = []
        c = arch.in_channels
        for w, k, s in zip(arch.widths, arch.kernels, arch.strides, strict=True):
            parts: list[nn.Module] = [conv(c, w, k, stride=s, padding=k // 2)]
            if arch.batch_norm:
                parts.append(norm(w))
            parts.append(act())
            blocks.append(nn.Sequential(*parts))
            c = w
        self.body = nn.Sequential(*blocks[:-1])
        self.layer = blocks[-1]
        self.pool = nn.Sequential(
            {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[arch.dims](
                1
            ),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c, arch.classes)
        g = torch.Generator().manual_seed(arch.seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.pool(self.layer(self.body(x))))
        return out


@st.composite
def cases(draw: Any, dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)) -> Any:
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    depth = draw(st.integers(1, 3))
    arch = Arch(
        dims=dims,
        in_channels=draw(st.integers(1, 3)),
        widths=tuple(draw(st.integers(2, 6)) for _ in range(depth)),
        kernels=tuple(draw(st.sampled_from([1, 3])) for _ in range(depth)),
        strides=tuple(draw(st.sampled_from([1, 2])) for _ in range(depth)),
        activation=draw(st.sampled_from(["relu", "gelu", "tanh"])),
        batch_norm=draw(st.booleans()),
        classes=draw(st.integers(2, 5)),
        seed=draw(st.integers(0, 2**16)),
    )
    low = 2 ** sum(s == 2 for s in arch.strides) * 2  # at least two positions at the layer
    high = {1: 24, 2: 12, 3: 6}[dims]
    size = tuple(draw(st.integers(low, max(low, high))) for _ in range(dims))
    batch = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(dtypes))
    target_kind = draw(st.sampled_from(["none", "int", "list"]))
    if target_kind == "int":
        target: Any = draw(st.integers(0, arch.classes - 1))
    elif target_kind == "list":
        target = [draw(st.integers(0, arch.classes - 1)) for _ in range(batch)]
    else:
        target = None
    method = draw(st.sampled_from(METHODS))
    g = torch.Generator().manual_seed(arch.seed + 1)
    x = torch.randn(batch, arch.in_channels, *size, generator=g).to(dtype)
    return Net(arch).to(dtype), x, target, method


def _explain(model: nn.Module, x: Tensor, target: Any, method: str, **opts: Any) -> Any:
    """explain, recording camkit's warnings: a blank map must come with one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", camkit.CamkitWarning)
        res = camkit.explain(
            model, x, method=method, layer="layer", target=target, **OPTIONS.get(method, {}), **opts
        )
    blank = res.maps.flatten(1).amax(1) == 0
    camkit_warnings = [w for w in caught if issubclass(w.category, camkit.CamkitWarning)]
    if bool(blank.any()):
        assert camkit_warnings, f"{method}: a blank map without a warning"
    return res


@SETTINGS
@given(cases())
def test_maps_have_the_input_shape_and_lie_in_unit_range(case: Any) -> None:
    model, x, target, method = case
    res = _explain(model, x, target, method)
    assert res.maps.shape == (x.shape[0], *x.shape[2:])
    assert res.maps.dtype == torch.float32
    assert bool(torch.isfinite(res.maps).all())
    assert float(res.maps.min()) >= 0.0 and float(res.maps.max()) <= 1.0
    assert res.scores.shape == (x.shape[0],) and bool(torch.isfinite(res.scores).all())


def _close(a: Tensor, b: Tensor, rel: float) -> None:
    """Equal within ``rel`` of the larger magnitude of the two."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-30)
    torch.testing.assert_close(a, b, rtol=0, atol=rel * scale)


@SETTINGS
@given(cases(dtypes=(torch.float64,)))
def test_a_batch_equals_its_samples_one_at_a_time(case: Any) -> None:
    model, x, target, method = case
    if method in ("sscam", "smoothgradcampp"):
        return  # random draws per batch, seeded per call: samples differ by design
    res = _explain(model, x, target, method)
    for i in range(x.shape[0]):
        t = target[i] if isinstance(target, list) else target
        one = _explain(model, x[i : i + 1], t, method)
        _close(res.raw[i], one.raw[0], 1e-9)
        torch.testing.assert_close(res.scores[i : i + 1], one.scores, rtol=1e-10, atol=1e-12)


@SETTINGS
@given(cases(dtypes=(torch.float64,)), st.integers(1, 5))
def test_results_do_not_depend_on_batch_size(case: Any, batch_size: int) -> None:
    model, x, target, method = case
    ref = _explain(model, x, target, method)
    got = _explain(model, x, target, method, batch_size=batch_size)
    _close(got.raw, ref.raw, 1e-9)
    _close(got.maps, ref.maps, 1e-6)
