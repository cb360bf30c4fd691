"""Finer-CAM (Zhang et al. 2025): the base method's map for a class against its closest classes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import correlation, small_net
from torch import Tensor

import camkit
from camkit.targets import FinerTarget
from camkit.testing import check_method

SIGNED = {"relu": False, "normalize": False, "upsample": None}


def test_finer_target_by_hand() -> None:
    # class 2 (predicted, logit 3): distances 3, 2, -, 0.5, 4: the two closest are 3 and 1
    y = torch.tensor([[0.0, 1.0, 3.0, 2.5, -1.0]])
    target = FinerTarget(None, alpha=0.5, n_compare=2).resolve(y, 1)
    assert target.classes.tolist() == [2] and target.compare.tolist() == [[3, 1]]
    p = torch.softmax(y[0], 0)
    expected = (p[3] * (3 - 0.5 * 2.5) + p[1] * (3 - 0.5 * 1)) / (p[3] + p[1])
    torch.testing.assert_close(target.scores(y, torch.tensor([0])), expected.reshape(1))
    # an explicit class: class 0 (logit 0) is closest to classes 1 and 4 (distance 1 each)
    assert set(FinerTarget(0, n_compare=2).resolve(y, 1).compare[0].tolist()) == {1, 4}


def test_finer_target_errors() -> None:
    y = torch.zeros(2, 3)
    with pytest.raises(camkit.TargetError, match="n_compare <= 2"):
        FinerTarget(n_compare=3).resolve(y, 2)
    with pytest.raises(camkit.TargetError, match="n_compare expects"):
        FinerTarget(n_compare=0)
    with pytest.raises(camkit.TargetError, match="3 classes for a batch of 2"):
        FinerTarget([0, 1, 2], n_compare=1).resolve(y, 2)
    with pytest.raises(camkit.TargetError, match=r"\[0, 2\]"):
        FinerTarget([0, 5], n_compare=1).resolve(y, 2)


def _reference(model: torch.nn.Module, x: Tensor, layer: str, alpha: float, k: int) -> Tensor:
    """Grad-CAM of the Finer-CAM score, float64, full graph: comparison classes by numpy argsort
    of |y - y_c| (the predicted class c first, at distance 0), score and gradient by backward."""
    m64 = copy.deepcopy(model).double()
    store: dict[str, Tensor] = {}

    def keep(mod: torch.nn.Module, args: object, out: Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = dict(m64.named_modules())[layer].register_forward_hook(keep)
    y = m64(x.double())
    handle.remove()
    logits = y.detach().numpy()
    total = y.new_zeros(())
    for i in range(len(x)):
        c = int(logits[i].argmax())
        order = np.argsort(np.abs(logits[i] - logits[i, c]), kind="stable")
        assert order[0] == c
        d = list(order[1 : k + 1])
        p = torch.softmax(y[i], 0)
        total = total + sum(p[j] * (y[i, c] - alpha * y[i, j]) for j in d) / sum(p[j] for j in d)
    total.backward()
    a, g = store["a"].detach(), store["a"].grad
    assert g is not None
    return (g.flatten(2).mean(2)[:, :, None, None] * a).sum(1)


@pytest.mark.parametrize(("alpha", "k"), [(1.0, 3), (0.5, 1)])
@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_finercam_matches_float64_reference(layer: str, alpha: float, k: int) -> None:
    model, x = small_net()
    ref = _reference(model, x, layer, alpha, k)
    res = camkit.explain(model, x, "finercam", layer=layer, alpha=alpha, n_compare=k, **SIGNED)
    assert torch.equal(res.targets, model(x).argmax(1))
    plain = camkit.explain(model, x, "gradcam", layer=layer, **SIGNED)
    for i in range(2):
        assert correlation(res.raw[i], ref[i]) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), ref[i], rtol=1e-4, atol=1e-5 * float(ref[i].abs().max())
        )
        assert correlation(plain.raw[i], ref[i]) < 0.999  # not Grad-CAM of the logit
    # the same target with Grad-CAM itself
    same = camkit.explain(
        model, x, "gradcam", layer=layer, target=FinerTarget(alpha=alpha, n_compare=k), **SIGNED
    )
    torch.testing.assert_close(same.raw, res.raw)


def test_finercam_alpha_zero_is_the_base_method() -> None:
    model, x = small_net()
    for base in ("gradcam", "gradcampp", "layercam"):
        res = camkit.explain(model, x, "finercam", layer="block2", base=base, alpha=0.0, **SIGNED)
        ref = camkit.explain(model, x, base, layer="block2", **SIGNED)
        torch.testing.assert_close(res.raw, ref.raw, rtol=1e-4, atol=1e-6)


def test_finercam_explains_the_given_classes() -> None:
    model, x = small_net()
    res = camkit.explain(model, x, "finercam", layer="block2", target=[3, 7])
    assert res.targets.tolist() == [3, 7]
    with pytest.raises(camkit.TargetError, match="finercam compares"):
        camkit.explain(model, x, "finercam", layer="block2", target=lambda out: out[:, 0])


@pytest.mark.parametrize(
    ("option", "bad"), [("base", "scorecam"), ("alpha", "1"), ("n_compare", 0)]
)
def test_finercam_options_are_checked(option: str, bad: object) -> None:
    model, x = small_net()
    with pytest.raises(camkit.OptionError, match=repr(option)):
        camkit.explain(model, x, "finercam", **{option: bad})


def test_finercam_passes_conformance_checks() -> None:
    check_method("finercam")


def test_finercam_matches_the_peer() -> None:
    """grad-cam 1.5.7's FinerCAM over GradCAM (predicted class, the 3 closest classes,
    alpha 1), at a layer of the input's resolution (no resizing on either side)."""
    finer = pytest.importorskip("pytorch_grad_cam.finer_cam")
    model, x = small_net()
    peer = finer.FinerCAM(model, [model.block1[1]])
    got = torch.as_tensor(peer(x, alpha=1.0))
    res = camkit.explain(model, x, "finercam", layer="block1.1")
    assert res.maps.shape == got.shape == (2, 16, 16)
    for i in range(2):
        assert correlation(res.maps[i], got[i]) > 0.9999
    torch.testing.assert_close(res.maps, got, rtol=1e-4, atol=1e-4)
