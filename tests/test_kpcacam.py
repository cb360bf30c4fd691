"""KPCA-CAM (Karmani et al. 2024): the activations' first kernel principal component."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import capture64, correlation, small_net

import camkit
from camkit.testing import check_method
from camkit.toy import TinyCNN

SIGNED = {"relu": False, "normalize": False, "upsample": None}
KERNELS = ["sigmoid", "rbf", "poly", "linear"]
TARGETS = [3, 7]


@pytest.fixture(scope="module")
def rn() -> dict:
    """The model, the batch, and float64 activations at block1 and block2."""
    model, x = small_net()
    acts = {layer: capture64(model, layer, x, TARGETS)[0] for layer in ("block1", "block2")}
    return {"model": model, "x": x, **acts}


def _kernel(x: np.ndarray, kernel: str, gamma: float, coef0: float, degree: int) -> np.ndarray:
    """Kernel matrix of the rows of ``x`` (P, C), entry by entry from the definitions."""
    if kernel == "rbf":
        diff = x[:, None, :] - x[None, :, :]
        return np.exp(-gamma * (diff**2).sum(-1))
    dot = x @ x.T
    return {
        "linear": dot,
        "poly": (gamma * dot + coef0) ** degree,
        "sigmoid": np.tanh(gamma * dot + coef0),
    }[kernel]


def _reference(
    a: torch.Tensor, kernel: str, gamma: float | None = None, coef0: float = 1.0, degree: int = 3
) -> torch.Tensor:
    """Kernel PCA of one sample ``a`` (C, H, W) in float64 numpy: centre the positions, centre
    the kernel as H K H with H = I - 1/P, project on the top eigenvector (K~ alpha / sqrt(lambda)),
    orient to correlate positively with the channel sum."""
    x = a.flatten(1).T.numpy()
    x = x - x.mean(0)
    p = x.shape[0]
    g = 1.0 / a.shape[0] if gamma is None else gamma
    h = np.eye(p) - np.full((p, p), 1.0 / p)
    kc = h @ _kernel(x, kernel, g, coef0, degree) @ h
    lam, vec = np.linalg.eigh(kc)
    assert lam[-1] > 1.01 * lam[-2], "first kernel component not well separated"
    proj = kc @ vec[:, -1] / np.sqrt(lam[-1])
    plain = a.sum(0).flatten().numpy()
    if np.dot(proj - proj.mean(), plain - plain.mean()) < 0:
        proj = -proj
    return torch.from_numpy(proj).reshape(a.shape[1:])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_kpcacam_matches_float64_reference(layer: str, kernel: str, rn: dict) -> None:
    model, x, a64 = rn["model"], rn["x"], rn[layer]
    # the RBF kernel of block2's large activations at gamma = 1/C is nearly the identity (no
    # leading component): a smaller gamma
    gamma = 0.005 if kernel == "rbf" else None
    res = camkit.explain(model, x, "kpcacam", layer=layer, kernel=kernel, gamma=gamma, **SIGNED)
    assert torch.equal(res.weights, torch.ones(2, a64.shape[1]))
    for i in range(2):
        ref = _reference(a64[i], kernel, gamma)
        assert correlation(res.raw[i], ref) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max())
        )


def test_kpcacam_kernel_parameters(rn: dict) -> None:
    model, x, a64 = rn["model"], rn["x"], rn["block2"]
    opts = {"gamma": 0.005, "coef0": 2.0, "degree": 2}
    for kernel in ("poly", "sigmoid", "rbf"):
        res = camkit.explain(model, x, "kpcacam", layer="block2", kernel=kernel, **opts, **SIGNED)
        default = camkit.explain(model, x, "kpcacam", layer="block2", kernel=kernel, **SIGNED)
        for i in range(2):
            assert correlation(res.raw[i], _reference(a64[i], kernel, **opts)) > 0.9999
        assert not torch.allclose(res.raw, default.raw)


def test_kpcacam_linear_kernel_is_eigencam(rn: dict) -> None:
    model, x = rn["model"], rn["x"]
    kpca = camkit.explain(model, x, "kpcacam", layer="block2", kernel="linear", **SIGNED)
    eigen = camkit.explain(model, x, "eigencam", layer="block2", **SIGNED)
    torch.testing.assert_close(kpca.raw, eigen.raw, rtol=1e-4, atol=1e-4)


def test_kpcacam_is_not_class_discriminative(rn: dict) -> None:
    model, x = rn["model"], rn["x"]
    a = camkit.explain(model, x, "kpcacam", layer="block2", target=TARGETS, **SIGNED).raw
    b = camkit.explain(model, x, "kpcacam", layer="block2", target=[0, 0], **SIGNED).raw
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("kernel", "cosine"),
        ("gamma", 0.0),
        ("gamma", "1"),
        ("coef0", float("inf")),
        ("degree", 0),
        ("degree", 2.0),
        ("center", 1),
    ],
)
def test_kpcacam_options_are_checked(option: str, bad: object) -> None:
    with pytest.raises(camkit.OptionError, match=repr(option)):
        camkit.explain(TinyCNN(), torch.zeros(1, 3, 8, 8), "kpcacam", **{option: bad})


def test_kpcacam_passes_conformance_checks() -> None:
    check_method("kpcacam")


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "poly"])
def test_kpcacam_matches_the_peer(kernel: str, rn: dict) -> None:
    """grad-cam 1.5.7's KPCA_CAM (scikit-learn's KernelPCA) on the same activations: the same
    projection up to the eigenvector's arbitrary sign, which camkit fixes by the channel sum."""
    kpca = pytest.importorskip("pytorch_grad_cam.kpca_cam")
    pytest.importorskip("sklearn")
    model, x, a64 = rn["model"], rn["x"], rn["block1"]
    peer = kpca.KPCA_CAM(model, [model.block1], kernel=kernel)
    got = torch.as_tensor(peer.get_cam_image(x, model.block1, None, a64.numpy(), None, False))
    res = camkit.explain(model, x, "kpcacam", layer="block1", kernel=kernel, **SIGNED)
    for i in range(2):
        theirs = got[i].double()
        if correlation(theirs, res.raw[i]) < 0:
            theirs = -theirs
        assert correlation(theirs, res.raw[i]) > 0.9999
        torch.testing.assert_close(
            res.raw[i].double(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max())
        )
