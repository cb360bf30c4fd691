"""RefineCAM: the product of a base method's normalised maps at several layers; grad-cam 1.5.7."""

from __future__ import annotations

import pytest
import torch
from helpers import ResidualNet

import camkit


def _normalized(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    out = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), 0)  # constant: 0
    return out.reshape(m.shape)


@pytest.mark.parametrize("base", ["gradcam", "gradcampp", "layercam"])
def test_refinecam_is_the_product_of_the_base_maps(base: str) -> None:
    torch.manual_seed(0)
    model = ResidualNet(inplace=False).eval().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layers = ["stem", "conv", "head"]  # 8x8, 8x8 and 8x8 before pooling
    res = camkit.explain(model, x, method="refinecam", base=base, layer=layers, target=[0, 2])
    # independently: the base method alone at each layer, normalised, multiplied, normalised
    product = torch.ones(2, 8, 8, dtype=torch.float64)
    for layer in layers:
        one = camkit.explain(model, x, method=base, layer=layer, target=[0, 2], normalize=False)
        product = product * _normalized(one.maps.double())
    torch.testing.assert_close(res.maps.double(), _normalized(product), rtol=1e-5, atol=1e-6)


def test_refinecam_matches_grad_cam_1_5_7() -> None:
    peer = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(2, 3, 8, 8)
    layers = ["stem", "conv"]
    ours = camkit.explain(model, x, method="refinecam", base="gradcam", layer=layers, target=[0, 2])
    modules = [dict(model.named_modules())[name] for name in layers]
    targets = [peer.utils.model_targets.ClassifierOutputTarget(c) for c in (0, 2)]
    theirs = peer.RefineCAM(model, modules, base_method=peer.GradCAM)(x, targets)
    # the peer divides by max + 1e-7 (maps to within 1e-6) and works in float32
    torch.testing.assert_close(ours.maps, torch.from_numpy(theirs).float(), rtol=0, atol=1e-5)


def test_option_errors() -> None:
    model = ResidualNet(inplace=False).eval()
    x = torch.randn(1, 3, 8, 8)
    for opts, match in [
        ({"base": "refinecam"}, "cannot be 'refinecam'"),
        ({"base": "nope"}, "option 'base': unknown method"),
        ({"base": 1}, "'base' expects a method name"),
        ({"base_options": {"gamma": 2.0}}, r"has \['gamma'\], which 'gradcampp' does not take"),
        ({"base": "layercam", "base_options": {"gamma": -1.0}}, "'gamma'"),
        ({"base_options": 3}, "'base_options' expects a dict"),
    ]:
        with pytest.raises(camkit.OptionError, match=match):
            camkit.explain(model, x, method="refinecam", layer=["stem", "conv"], **opts)
