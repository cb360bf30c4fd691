"""Deep Feature Factorization (Collins et al. 2018): per-sample NMF of the activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import capture64, correlation, small_net

import camkit
from camkit.testing import check_method

SIGNED = {"relu": False, "normalize": False, "upsample": None}
K, ITERS, SEED = 3, 150, 4


def _reference(a: torch.Tensor, k: int, n_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lee & Seung's multiplicative updates in float64 numpy for one sample ``a`` (C, H, W),
    from the documented start (one seeded uniform draw, scaled by sqrt(mean(V) / K)); each
    concept scaled to peak at 1. Returns W (P, K) and H (K, C)."""
    v = a.flatten(1).T.numpy()
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(v.shape[0], k, generator=g, dtype=torch.float64).numpy()
    h = torch.rand(k, v.shape[1], generator=g, dtype=torch.float64).numpy()
    s = np.sqrt(v.mean() / k)
    w, h = w * s, h * s
    for _ in range(n_iter):
        h = h * (w.T @ v) / (w.T @ w @ h + 1e-12)
        w = w * (v @ h.T) / (w @ h @ h.T + 1e-12)
    peak = w.max(0)
    return w / peak, h * peak[:, None]


def test_dff_matches_float64_reference() -> None:
    model, x = small_net()
    a64, _ = capture64(model, "block3", x, [0, 0])
    res = camkit.explain(
        model,
        x,
        "dff",
        layer="block3",
        target=[3, 7],
        n_components=K,
        n_iter=ITERS,
        seed=SEED,
        **SIGNED,
    )
    concepts = res.extras["concepts"]
    emb = res.extras["concept_embeddings"]
    scores = res.extras["concept_scores"]
    assert concepts.shape == (2, K, 4, 4) and emb.shape == (2, K, 32) and scores.shape == (2, K)
    fc_w, fc_b = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    for i, c in enumerate([3, 7]):
        w, h = _reference(a64[i], K, ITERS, SEED)
        # the concept's score: the classifier on its embedding (pooling a constant map)
        ref_scores = h @ fc_w[c].numpy() + float(fc_b[c])
        order = np.argsort(-ref_scores)
        np.testing.assert_allclose(scores[i].double().numpy(), ref_scores[order], rtol=1e-4)
        for j, kk in enumerate(order):
            ref_map = torch.from_numpy(w[:, kk]).reshape(4, 4)
            assert correlation(concepts[i, j], ref_map) > 0.9999
            torch.testing.assert_close(concepts[i, j].double(), ref_map, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(
                emb[i, j].double(), torch.from_numpy(h[kk]), rtol=1e-4, atol=1e-4
            )
        # the map is the best concept's; the weights its embedding
        torch.testing.assert_close(res.raw[i], concepts[i, 0])
        torch.testing.assert_close(res.weights[i], emb[i, 0])
        # a good factorisation: within 5% of the best rank-K error (the truncated SVD's, which
        # no factorisation, non-negative or not, can beat)
        v = a64[i].flatten(1).T.numpy()
        sigma = np.linalg.svd(v, compute_uv=False)
        best = np.sqrt((sigma[K:] ** 2).sum())
        assert best <= np.linalg.norm(v - w @ h) < 1.05 * best


def test_dff_is_reproducible_and_seeded() -> None:
    model, x = small_net()
    a = camkit.explain(model, x, "dff", layer="block2", seed=1).extras["concepts"]
    b = camkit.explain(model, x, "dff", layer="block2", seed=1).extras["concepts"]
    c = camkit.explain(model, x, "dff", layer="block2", seed=2).extras["concepts"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dff_several_layers_key_extras_by_layer() -> None:
    model, x = small_net()
    res = camkit.explain(model, x, "dff", layer=["block2", "block3"], n_components=2)
    assert set(res.extras) == {"block2", "block3"}
    assert res.extras["block3"]["concepts"].shape == (2, 2, 4, 4)


def test_dff_refuses_negative_activations() -> None:
    model, x = small_net()
    with pytest.raises(camkit.LayerError, match="non-negative"):
        camkit.explain(model, x, "dff", layer="block2.0")  # a convolution, before its ReLU


@pytest.mark.parametrize(("option", "bad"), [("n_components", 0), ("n_iter", 1.5)])
def test_dff_options_are_checked(option: str, bad: object) -> None:
    model, x = small_net()
    with pytest.raises(camkit.OptionError, match=repr(option)):
        camkit.explain(model, x, "dff", **{option: bad})
    with pytest.raises(camkit.OptionError, match="at most min"):
        camkit.explain(model, x, "dff", layer="block3", n_components=17)  # 16 positions


def test_dff_passes_conformance_checks() -> None:
    check_method("dff", n_iter=50)
