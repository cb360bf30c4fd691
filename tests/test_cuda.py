"""Every method and metric on CUDA gives what it gives on the CPU.

A small CNN (and, for LeGrad, a two-block torchvision ViT) with the same weights explained on
both devices in float32 with TF32 off: deterministic methods give the CPU's maps to 1e-4 of their
range and metrics the CPU's values to 1e-4; methods and metrics that draw random numbers (from a
generator on the inputs' device, whose CUDA stream differs from the CPU's) give maps of the same
shape on the GPU, finite, and the same twice for one seed. Skipped without CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import camkit

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    pytest.mark.filterwarnings("ignore::camkit.BlankMapWarning"),
]

METHODS = camkit.list_methods()
#: methods whose maps follow random draws (masks, noise, a random map, NMF's start)
RANDOM_METHODS = {"random", "rise", "sscam", "iscam", "smoothgradcampp", "dff"}
OPTIONS: dict[str, dict[str, Any]] = {
    "sscam": {"n_samples": 2},
    "iscam": {"n_samples": 2},
    "smoothgradcampp": {"n_samples": 2},
    "rise": {"n_masks": 64},
    "occlusion": {"patch": 4, "stride": 4},
}
LAYER = {"fullgrad": "layer.0", "legrad": "encoder.layers.encoder_layer_1"}
#: metrics that draw random numbers: ROAD's imputation noise, the randomised weights, the
#: perturbations
RANDOM_METRICS = {"road", "road-lerf", "road-morf", "model-randomization", "max-sensitivity"}
METRIC_OPTIONS: dict[str, dict[str, Any]] = {
    "deletion": {"steps": 8},
    "insertion": {"steps": 8},
    "road": {"percentiles": (20, 50)},
    "road-lerf": {"percentiles": (20, 50)},
    "road-morf": {"percentiles": (20, 50)},
    "max-sensitivity": {"n_samples": 2},
}


class Net(nn.Module):
    """conv -> (conv, batch norm, ReLU) -> GAP -> fc, weights drawn from a seeded generator."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            self.layer[1].running_mean.copy_(torch.randn(8, generator=g) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.layer(torch.relu(self.stem(x)))
        out: Tensor = self.fc(a.mean((2, 3)))
        return out


def _vit() -> nn.Module:
    tv = pytest.importorskip("torchvision.models")
    model = tv.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
        num_classes=5,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def _no_tf32() -> Iterator[None]:
    """float32 on the GPU as on the CPU: TF32 would round convolutions and products to 10 bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _explain(model: nn.Module, x: Tensor, method: str) -> camkit.CamResult:
    layer = LAYER.get(method, "layer")
    return camkit.explain(model, x, method=method, layer=layer, target=1, **OPTIONS.get(method, {}))


def _close(a: Tensor, b: Tensor, what: str) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a.cpu().double() - b.double()).abs().max()) / scale
    assert err <= 1e-4, f"{what}: CUDA differs from the CPU by {err:.2e} of the range"


@pytest.mark.parametrize("method", METHODS)
def test_method_on_cuda_matches_the_cpu(method: str) -> None:
    cpu_model = _vit() if method == "legrad" else Net().eval()
    gpu_model = (_vit() if method == "legrad" else Net().eval()).cuda()
    cpu = _explain(cpu_model, X, method)
    gpu = _explain(gpu_model, X.cuda(), method)
    assert gpu.maps.device.type == "cuda"
    assert gpu.maps.shape == cpu.maps.shape == (2, 16, 16)
    assert torch.isfinite(gpu.maps).all()
    if method in RANDOM_METHODS:
        again = _explain(gpu_model, X.cuda(), method)
        assert torch.equal(gpu.maps, again.maps), "same seed, different maps on CUDA"
    else:
        _close(gpu.maps, cpu.maps, method)
    # the model is left on its device, untouched
    assert all(p.device.type == "cuda" for p in gpu_model.parameters())


@pytest.mark.parametrize("metric", camkit.list_metrics())
def test_metric_on_cuda_matches_the_cpu(metric: str) -> None:
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 4:12] = True
    model = Net().eval()
    res = camkit.explain(model, X, method="gradcam", layer="layer", target=1)
    opts = METRIC_OPTIONS.get(metric, {})
    info = camkit.default_registry().get_metric(metric)
    if metric == "class-discrimination":
        masks = torch.stack([masks, ~masks], 1)  # region 0 the explained object's
    kw: dict[str, Any] = {"masks": masks} if "masks" in info.needs else {}
    cpu = camkit.evaluate(model, X, res, metric, **kw, **opts).values
    gpu_model = Net().eval().cuda()
    gres = camkit.explain(gpu_model, X.cuda(), method="gradcam", layer="layer", target=1)
    gkw = {k: v.cuda() for k, v in kw.items()}
    gpu = camkit.evaluate(gpu_model, X.cuda(), gres, metric, **gkw, **opts).values
    assert gpu.shape == cpu.shape == (2,)
    assert torch.isfinite(gpu).all()
    if metric in RANDOM_METRICS:
        again = camkit.evaluate(gpu_model, X.cuda(), gres, metric, **gkw, **opts).values
        assert torch.equal(gpu, again), "same seed, different values on CUDA"
    else:
        assert torch.allclose(gpu.cpu().double(), cpu.double(), atol=1e-4), (gpu, cpu)


def test_compare_runs_on_cuda() -> None:
    model = Net().eval().cuda()
    table = camkit.compare(
        model, X.cuda(), methods=["gradcam", "random"], metrics=["deletion"], layer="layer"
    )
    assert [r["method"] for r in table.rows] == ["gradcam", "random"]
    assert all(0.0 <= r["deletion"] <= 1.0 for r in table.rows)


def test_auto_chunks_fit_the_free_memory() -> None:
    from camkit.batching import auto_batch_size

    rows = auto_batch_size(torch.empty(1, 3, 224, 224, device="cuda"))
    assert rows >= 1 and rows & (rows - 1) == 0
