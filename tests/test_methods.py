"""The CAM family beyond Grad-CAM, against the papers' equations.

Three kinds of checks for cam, gradcampp, xgradcam, hirescam, gradcam-elementwise, layercam,
eigencam, eigengradcam, smoothgradcampp and random:

1. values derived by hand on tiny models with known weights (derivations in the comments; the
   numbers are dyadic, so most results are exact in float32);
2. on a random-init torchvision resnet18 at ``layer4`` and ``layer2``, each method's raw map
   against a float64 reference of the paper's equation written here, per sample, from a
   full-graph float64 copy of the model (``y[c].backward()`` with ``retain_grad``);
3. ``camkit.testing.check_method`` for every method.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import FlattenHead, GapHead, MaxPoolHead, SquareHead, TwoLayerHead
from torch import Tensor

import camkit
from camkit.testing import check_method
from camkit.toy import TinyCNN

METHODS = [
    "cam",
    "gradcampp",
    "xgradcam",
    "hirescam",
    "gradcam-elementwise",
    "layercam",
    "eigencam",
    "eigengradcam",
    "smoothgradcampp",
    "random",
]
SIGNED = {"relu": False, "normalize": False}  # the map before ReLU, at layer resolution
X4 = torch.zeros(1, 1, 2, 2)  # Fixed layers ignore the input's values


def _flatten_head(a: Tensor, grads: Tensor) -> FlattenHead:
    """A model whose layer gives ``a`` (N, C, H, W) and whose class ``c`` has gradient
    ``grads[c]`` (C, H, W) at every position: the linear weights over the flattened layer."""
    return FlattenHead(a, grads.flatten(1)).eval()


# ---------------------------------------------------------------------------------------------
# CAM (Zhou et al. 2016, eq. 2): M_c = sum_k W_ck A_k with W the classifier after GAP
# ---------------------------------------------------------------------------------------------

CAM_A = torch.tensor(
    [
        [[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [2.0, -2.0]]],
        [[[0.0, 1.0], [1.0, 0.0]], [[2.0, 2.0], [0.0, 4.0]]],
    ]
)
CAM_W = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
CAM_B = torch.tensor([1.0, -1.0])
# sample 0, class 0: M = 2 A0 - A1 = [[3, 4], [4, 10]]
# sample 1, class 1: M = 0.5 A0 + 3 A1 = [[6, 6.5], [0.5, 12]]
CAM_RAW = torch.tensor([[[3.0, 4.0], [4.0, 10.0]], [[6.0, 6.5], [0.5, 12.0]]])


def _cam_model() -> GapHead:
    return GapHead(CAM_A, CAM_W, CAM_B).eval()


@pytest.mark.parametrize("fc", [None, "fc", "module"])
def test_cam_by_hand_finds_or_takes_the_head(fc: str | None) -> None:
    model = _cam_model()
    option = model.fc if fc == "module" else fc
    res = camkit.explain(
        model, torch.zeros(2, 1, 2, 2), "cam", layer="layer", target=[0, 1], fc=option, **SIGNED
    )
    # the decoy Linear(2, 2) comes first in model.modules() but does not reproduce the scores
    assert torch.equal(res.weights, torch.tensor([[2.0, -1.0], [0.5, 3.0]]))
    assert torch.equal(res.raw, CAM_RAW)
    # y = W . mean(A) + b: sample 0: 2 * 2.5 - (-0.25) + 1; sample 1: 0.5 * 0.5 + 3 * 2 - 1
    assert torch.equal(res.scores, torch.tensor([6.25, 5.25]))


def test_cam_equals_gradcam_times_positions_on_gap_linear() -> None:
    # dy/dA_ij = W_ck / P with P = 4 positions, so Grad-CAM's map is CAM's divided by 4
    model = _cam_model()
    kw = {"layer": "layer", "target": [0, 1], **SIGNED}
    cam = camkit.explain(model, torch.zeros(2, 1, 2, 2), "cam", **kw)
    grad = camkit.explain(model, torch.zeros(2, 1, 2, 2), "gradcam", **kw)
    assert torch.equal(cam.raw, 4 * grad.raw)


def test_cam_refuses_models_without_a_gap_linear_head() -> None:
    a = CAM_A[:1]
    # max pooling: fc has C inputs but mean-pooled activations do not reproduce the scores
    # (class 0: max 4 + max 2 = 6, while the means give 2.5 - 0.25)
    maxpool = MaxPoolHead(a, torch.tensor([[1.0, 1.0], [3.0, -2.0]])).eval()
    with pytest.raises(camkit.LayerError, match="fc="):
        camkit.explain(maxpool, X4, "cam", layer="layer", target=0)
    # flatten + linear: no nn.Linear with C = 2 inputs at all
    flat = FlattenHead(a, torch.ones(2, 8)).eval()
    with pytest.raises(camkit.LayerError):
        camkit.explain(flat, X4, "cam", layer="layer", target=0)
    # a named head that is not the classifier, and a name that is not an nn.Linear
    model = _cam_model()
    with pytest.raises(camkit.LayerError):
        camkit.explain(model, torch.zeros(2, 1, 2, 2), "cam", layer="layer", fc="decoy")
    with pytest.raises(camkit.LayerError):
        camkit.explain(model, torch.zeros(2, 1, 2, 2), "cam", layer="layer", fc="layer")


def test_cam_refuses_non_class_targets() -> None:
    model = _cam_model()
    with pytest.raises(camkit.TargetError):
        camkit.explain(
            model, torch.zeros(2, 1, 2, 2), "cam", layer="layer", target=lambda out: out[:, 0]
        )


# ---------------------------------------------------------------------------------------------
# Grad-CAM++ (Chattopadhay et al. 2018, eq. 19):
#   alpha_ij = g_ij^2 / (2 g_ij^2 + (sum_ab A_ab) g_ij^3),  w = sum_ij alpha_ij ReLU(g_ij)
# For g > 0: alpha = 1 / (2 + S g) with S = sum_ab A_ab, so alpha * g = g / (2 + S g).
# ---------------------------------------------------------------------------------------------

PP_A = torch.tensor(
    [
        [  # sample 0: non-negative activations, S = 2, 2, 6
            [[1.0, 0.0], [0.0, 1.0]],
            [[0.5, 0.5], [0.5, 0.5]],
            [[2.0, 0.0], [4.0, 0.0]],
        ],
        [  # sample 1: signed activations, S = -2, 0, 4
            [[-3.0, 1.0], [0.0, 0.0]],
            [[1.0, -1.0], [2.0, -2.0]],
            [[1.0, 1.0], [1.0, 1.0]],
        ],
    ]
)
PP_G = torch.tensor(
    [
        [  # class 0, explained for sample 0
            [[1.0, 3.0], [-1.0, 0.0]],
            [[7.0, 3.0], [-2.0, 1.0]],
            [[1.0, 5.0], [0.0, -1.0]],
        ],
        [  # class 1, explained for sample 1
            [[2.0, -1.0], [0.0, 1.0]],
            [[4.0, 1.0], [-3.0, 0.0]],
            [[0.5, 1.5], [-1.0, 3.5]],
        ],
    ]
)
# sample 0
#   k=0, S=2: g=1 -> 1/4, g=3 -> 3/8; g<=0 -> 0                      w = 0.625
#   k=1, S=2: g=7 -> 7/16, g=3 -> 3/8, g=1 -> 1/4                     w = 1.0625
#   k=2, S=6: g=1 -> 1/8, g=5 -> 5/32                                 w = 0.28125
#   Without the S g^3 term (alpha = 1/2) w = (2, 5.5, 3); with sum_ab A_ab g_ab^3 (= 1, 181.5,
#   2) in place of S g_ij^3, k=0 would give 1/3 + 27/19: both differ.
# sample 1: max(S, 0) = 0 for k=0 (S=-2) and k=1 (S=0): alpha = 1/2 for every g > 0
#   k=0: (2 + 1) / 2 = 1.5 (the unguarded paper formula would divide by 2 - 2 * 1 = 0 at g=1)
#   k=1: (4 + 1) / 2 = 2.5
#   k=2, S=4: g=0.5 -> 0.5/4, g=1.5 -> 1.5/8, g=3.5 -> 3.5/16       w = 0.53125
PP_W = torch.tensor([[0.625, 1.0625, 0.28125], [1.5, 2.5, 0.53125]])
# raw = sum_k w_k A_k
PP_RAW = torch.tensor(
    [
        [[1.71875, 0.53125], [1.65625, 1.15625]],
        [[-1.46875, -0.46875], [5.53125, -4.46875]],
    ]
)


def test_gradcampp_by_hand() -> None:
    model = _flatten_head(PP_A, PP_G)
    res = camkit.explain(model, torch.zeros(2, 1, 2, 2), "gradcampp", layer="layer", target=[0, 1])
    assert torch.equal(res.weights, PP_W)
    assert torch.equal(res.raw, PP_RAW.clamp_min(0))
    signed = camkit.explain(
        model, torch.zeros(2, 1, 2, 2), "gradcam++", layer="layer", target=[0, 1], **SIGNED
    )
    assert torch.equal(signed.raw, PP_RAW)
    assert signed.method == "gradcampp"


def test_gradcampp_one_positive_gradient_per_channel() -> None:
    # k=0: A all zero, S = 0: alpha = g^2 / (2 g^2) = 1/2 at g = 0.5 -> w = 0.25
    # k=1: A all one, S = 4: alpha g = 0.5 / (2 + 4 * 0.5) -> w = 0.125
    a = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    g = torch.tensor([[[[0.5, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.5]]]])
    # the map is constant (0.125 everywhere): blank, and said so
    with pytest.warns(camkit.BlankMapWarning, match="constant for 1 of 1"):
        res = camkit.explain(
            _flatten_head(a, g), X4, "gradcampp", layer="layer", target=0, **SIGNED
        )
    assert torch.equal(res.weights, torch.tensor([[0.25, 0.125]]))
    assert torch.equal(res.raw, torch.full((1, 2, 2), 0.125))


# ---------------------------------------------------------------------------------------------
# XGrad-CAM (Fu et al. 2020, eq. 8): w_k = sum_ij A_ij / (sum_ab A_ab) * g_ij; 0 if the sum is 0
# ---------------------------------------------------------------------------------------------


def test_xgradcam_by_hand() -> None:
    a = torch.tensor(
        [
            [
                [[1.0, 2.0], [3.0, 2.0]],  # S = 8
                [[1.0, -1.0], [0.0, 0.0]],  # S = 0, activations not all zero
                [[0.0, 0.0], [0.0, 0.0]],  # S = 0, all zero
                [[4.0, 0.0], [0.0, 0.0]],  # S = 4
            ]
        ]
    )
    g = torch.tensor(
        [
            [
                [[2.0, -1.0], [1.0, 4.0]],
                [[3.0, -1.0], [2.0, 2.0]],
                [[5.0, 5.0], [5.0, 5.0]],
                [[-0.5, 9.0], [9.0, 9.0]],
            ]
        ]
    )
    res = camkit.explain(_flatten_head(a, g), X4, "xgradcam", layer="layer", target=0, **SIGNED)
    # k=0: (2 - 2 + 3 + 8) / 8 = 1.375; k=1, k=2: zero sum -> 0 (sum A g = 4 for k=1 would
    # make any epsilon rule explode); k=3: (4 * -0.5) / 4 = -0.5
    assert torch.equal(res.weights, torch.tensor([[1.375, 0.0, 0.0, -0.5]]))
    # raw = 1.375 A0 - 0.5 A3 = [[1.375 - 2, 2.75], [4.125, 2.75]]
    assert torch.equal(res.raw, torch.tensor([[[-0.625, 2.75], [4.125, 2.75]]]))


# ---------------------------------------------------------------------------------------------
# HiResCAM (sum_k g_k * A_k), element-wise Grad-CAM (sum_k ReLU(g_k * A_k)), LayerCAM
# (sum_k ReLU(g_k) * A_k), on one sample where the three differ
# ---------------------------------------------------------------------------------------------

EL_A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 1.0], [2.0, -2.0]]]])
EL_G = torch.tensor([[[[1.0, -1.0], [2.0, 0.0]], [[-2.0, 3.0], [0.5, 1.0]]]])
# g0 * A0 = [[1, -2], [6, 0]], g1 * A1 = [[2, 3], [1, -2]]
# HiResCAM:       [[3, 1], [7, -2]]
# element-wise:   [[1 + 2, 0 + 3], [6 + 1, 0 + 0]] = [[3, 3], [7, 0]]
# LayerCAM: ReLU(g0) A0 + ReLU(g1) A1 = [[1, 0], [6, 0]] + [[0, 3], [1, -2]] = [[1, 3], [7, -2]]
ELEMENTWISE_CASES = {
    "hirescam": (EL_G, [[3.0, 1.0], [7.0, -2.0]]),
    "gradcam-elementwise": (EL_G, [[3.0, 3.0], [7.0, 0.0]]),
    "layercam": (EL_G.clamp_min(0), [[1.0, 3.0], [7.0, -2.0]]),
}


@pytest.mark.parametrize("method", sorted(ELEMENTWISE_CASES))
def test_elementwise_methods_by_hand(method: str) -> None:
    weights, signed = ELEMENTWISE_CASES[method]
    model = _flatten_head(EL_A, EL_G)
    res = camkit.explain(model, X4, method, layer="layer", target=0, **SIGNED)
    assert torch.equal(res.weights, weights)
    assert torch.equal(res.raw, torch.tensor([signed]))
    relu = camkit.explain(model, X4, method, layer="layer", target=0, normalize=False)
    assert torch.equal(relu.raw, torch.tensor([signed]).clamp_min(0))


# ---------------------------------------------------------------------------------------------
# LayerCAM fusion (Jiang et al. 2021, sec. III-C): shallow maps scaled by tanh(gamma M / max M),
# then the element-wise maximum with the deepest map, checked against single-layer results
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_layercam_fusion_from_single_layers(normalize: bool, gamma: float) -> None:
    model = TinyCNN(seed=3).eval()
    x = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(4))
    kw = {"target": [0, 1], "normalize": normalize, "gamma": gamma}
    # features.0 (conv, signed) and features.1 (ReLU) at 12x16; features.3 at 6x8 runs last
    names = ["features.0", "features.1", "features.3"]
    single = {n: camkit.explain(model, x, "layercam", layer=n, **kw) for n in names}
    fused = camkit.explain(
        model, x, "layercam", layer=["features.3", "features.0", "features.1"], **kw
    )
    assert fused.layer == names  # ordered by the forward, whatever order they were given in
    expected = single["features.3"].maps  # upsampled to 12x16 (normalised if asked)
    for n in names[:2]:
        m = single[n].maps
        assert float(m.flatten(1).amax(1).min()) > 0
        peak = m.flatten(1).amax(1)[:, None, None]
        expected = torch.maximum(expected, torch.tanh(gamma * m / peak))
    if normalize:
        lo = expected.flatten(1).amin(1)[:, None, None]
        hi = expected.flatten(1).amax(1)[:, None, None]
        expected = (expected - lo) / (hi - lo)
    torch.testing.assert_close(fused.maps, expected, rtol=1e-5, atol=1e-6)
    for n in names:
        torch.testing.assert_close(fused.raw[n], single[n].raw, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fused.weights[n], single[n].weights, rtol=1e-5, atol=1e-7)
    # the fusion is not the default mean: the deepest map wins where it is the larger
    mean = torch.stack([single[n].maps for n in names]).mean(0)
    assert not torch.allclose(fused.maps, mean, atol=1e-3)


# Two layers with known maps: A = [[1, 2], [3, 4]] (one channel), W = 1 everywhere.
#   deep:    activation 2A, gradient W = 1      -> M_d = ReLU(1 * 2A) = [[2, 4], [6, 8]]
#   shallow: activation A,  gradient 2W = 2     -> M_s = ReLU(2 * A)  = [[2, 4], [6, 8]]
# The shallow map's minimum (2) is above zero, so tanh(gamma M / max M) and the same rule on
# the min-max normalised map differ.
TWO_A = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
TWO_M = torch.tensor([[[2.0, 4.0], [6.0, 8.0]]])


def _two_layers(**kw: object) -> camkit.CamResult:
    model = TwoLayerHead(TWO_A, torch.ones(1, 4)).eval()
    return camkit.explain(model, X4, "layercam", layer=["deep", "shallow"], target=0, **kw)


def test_layercam_fusion_by_hand_unnormalised() -> None:
    res = _two_layers(normalize=False)
    assert res.layer == ["shallow", "deep"]
    assert torch.equal(res.raw["shallow"], TWO_M) and torch.equal(res.raw["deep"], TWO_M)
    assert torch.equal(res.weights["shallow"], torch.full((1, 1, 2, 2), 2.0))
    # max(M_d, tanh(2 M_s / 8)) = M_d: the deepest map is >= 2 > tanh(anything)
    assert torch.equal(res.maps, TWO_M)


def test_layercam_fusion_scales_the_shallow_map_by_its_max() -> None:
    res = _two_layers()  # normalize=True, gamma=2
    # paper (sec. III-C): shallow tanh(2 M_s / max M_s) = tanh([[0.5, 1], [1.5, 2]])
    #   = [[0.4621, 0.7616], [0.9051, 0.9640]]; deepest map normalised as camkit does for every
    #   layer: (M_d - 2) / 6 = [[0, 1/3], [2/3, 1]]; element-wise max
    #   [[0.4621, 0.7616], [0.9051, 1]], min-max normalised: [[0, 0.5568], [0.8237, 1]].
    # (scaling the min-max normalised shallow map instead would give [[0, 0.5828], [0.8701, 1]])
    shallow = torch.tanh(2 * TWO_M / TWO_M.max())
    deep = (TWO_M - TWO_M.min()) / (TWO_M.max() - TWO_M.min())
    fused = torch.maximum(deep, shallow)
    expected = (fused - fused.min()) / (fused.max() - fused.min())
    torch.testing.assert_close(res.maps, expected)


# ---------------------------------------------------------------------------------------------
# Eigen-CAM (Muhammad & Yeasin 2020): projection on the first principal component, oriented to
# correlate positively with the channel sum; center=False projects the uncentred matrix
# ---------------------------------------------------------------------------------------------

# zero-mean, orthogonal position patterns: |u|^2 = 10, |w|^2 = 4, u . w = 0
U = torch.tensor([[1.0, -1.0], [2.0, -2.0]])
WP = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
# channels 3u + 4w + 10 and 4u - 3w + 20: centred, M = u (3, 4) + w (4, -3), singular values
# 5 |u| > 5 |w| with right singular vectors (3, 4)/5 and (4, -3)/5, so the projection on the
# first is M (3, 4)/5 = 5u. The channel sum 7u + w + 30 correlates with +5u (35 |u|^2 > 0).
EIGEN_A = torch.stack([3 * U + 4 * WP + 10, 4 * U - 3 * WP + 20])[None]
# rank one uncentred: channels 3t and 4t, t > 0; uncentred projection 5t, centred 5 (t - 3)
T = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
RANK1_A = torch.stack([3 * T, 4 * T])[None]


def _eigen(a: Tensor, method: str = "eigencam", **kw: object) -> camkit.CamResult:
    model = _flatten_head(a, torch.zeros(2, *a.shape[1:]))
    return camkit.explain(model, X4, method, layer="layer", target=0, **{**SIGNED, **kw})


def _close(got: Tensor, expected: Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_eigencam_by_hand() -> None:
    res = _eigen(EIGEN_A)
    assert torch.equal(res.weights, torch.ones(1, 2))
    _close(res.raw, (5 * U)[None])  # [[5, -5], [10, -10]]
    relu = _eigen(EIGEN_A, relu=True)
    _close(relu.raw, (5 * U).clamp_min(0)[None])


def test_eigencam_sign_follows_the_channel_sum() -> None:
    # negated activations: the component is the same up to sign; the channel sum -(7u + w) - 30
    # now correlates with -5u, so the map is negated (not left to the SVD's arbitrary sign)
    _close(_eigen(-EIGEN_A).raw, (-5 * U)[None])
    # channels 3u + 10 and -4u + 20: rank one, component (3, -4)/5, projections +-5u; the
    # channel sum -u + 30 correlates with -5u, which is the map
    a = torch.stack([3 * U + 10, -4 * U + 20])[None]
    _close(_eigen(a).raw, (-5 * U)[None])


def test_eigencam_center_option() -> None:
    # centred (default): 5 (t - mean t) = 5 [[-2, -1], [0, 3]]; uncentred: 5t
    _close(_eigen(RANK1_A).raw, (5 * (T - 3))[None])
    _close(_eigen(RANK1_A, center=False).raw, (5 * T)[None])
    _close(_eigen(-RANK1_A, center=False).raw, (-5 * T)[None])


def test_eigencam_ignores_the_target() -> None:
    model = TinyCNN(seed=1).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = camkit.explain(model, x, "eigencam", layer="features", target=[0, 1], **SIGNED)
    b = camkit.explain(model, x, "eigencam", layer="features", target=[4, 2], **SIGNED)
    assert torch.equal(a.raw, b.raw) and float(a.raw.abs().max()) > 0


def test_eigengradcam_by_hand() -> None:
    # A = 1 everywhere, so g * A = g = the linear weights: class 0 gets EIGEN_A's matrix (map
    # 5u), class 1 its negation (map -5u, by the sign rule); per-element weights are g
    g = torch.cat([EIGEN_A, -EIGEN_A])
    model = _flatten_head(torch.ones(2, 2, 2, 2), g)
    res = camkit.explain(
        model, torch.zeros(2, 1, 2, 2), "eigengradcam", layer="layer", target=[0, 1], **SIGNED
    )
    assert torch.equal(res.weights, g)
    _close(res.raw, torch.stack([5 * U, -5 * U]))
    flat = _flatten_head(torch.ones(1, 2, 2, 2), RANK1_A)
    res = camkit.explain(flat, X4, "eigengradcam", layer="layer", target=0, center=False, **SIGNED)
    _close(res.raw, (5 * T)[None])


# ---------------------------------------------------------------------------------------------
# random: one uniform weight per channel from the call's seeded generator, shared by the batch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7])
def test_random_weights_are_the_seeded_draw(seed: int) -> None:
    model = _flatten_head(EL_A.expand(2, -1, -1, -1), torch.ones(2, 2, 2, 2))
    res = camkit.explain(
        model, torch.zeros(2, 1, 2, 2), "random", layer="layer", seed=seed, **SIGNED
    )
    w = torch.rand(2, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(res.weights, w.expand(2, 2))
    _close(res.raw, (w[0] * EL_A[0, 0] + w[1] * EL_A[0, 1]).expand(2, -1, -1))


def test_random_seeds_batches_and_targets() -> None:
    model = TinyCNN(seed=2).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {"layer": "features", **SIGNED}
    a = camkit.explain(model, x, "random", target=[0, 1, 2], seed=3, **kw)
    again = camkit.explain(model, x, "random", target=[0, 1, 2], seed=3, **kw)
    other = camkit.explain(model, x, "random", target=[0, 1, 2], seed=4, **kw)
    retarget = camkit.explain(model, x, "random", target=[4, 4, 0], seed=3, **kw)
    alone = camkit.explain(model, x[1:2], "random", target=[1], seed=3, **kw)
    assert torch.equal(a.weights, again.weights) and torch.equal(a.raw, again.raw)
    assert not torch.allclose(a.weights, other.weights)
    assert torch.equal(a.weights, retarget.weights) and torch.equal(a.raw, retarget.raw)
    assert torch.equal(alone.weights[0], a.weights[1])
    torch.testing.assert_close(alone.raw[0], a.raw[1], rtol=1e-6, atol=1e-7)
    assert bool((a.weights >= 0).all()) and bool((a.weights < 1).all())


# ---------------------------------------------------------------------------------------------
# Smooth Grad-CAM++ (Omeiza et al. 2019): Grad-CAM++ with D_p = mean over noisy copies of g^p,
#   alpha = D2 / (2 D2 + (sum_ab A_ab) D3), w = sum alpha ReLU(D1), A of the clean input
# ---------------------------------------------------------------------------------------------

SQ_W = torch.tensor(
    [
        [1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 1.5, -0.5],
        [-1.0, 1.0, 2.0, -3.0, 0.5, 0.5, -2.0, 4.0],
        [2.0, 2.0, -1.0, -1.0, 1.0, -1.0, 3.0, 0.25],
    ]
)


def _square_input() -> Tensor:
    return torch.rand(2, 2, 2, 2, generator=torch.Generator().manual_seed(5)) + 0.25


def _paper_gradcampp(a: Tensor, d1: Tensor, d2: Tensor, d3: Tensor) -> Tensor:
    """Eq. 19 of Chattopadhay et al. for one sample ``(C, *S)``, with the D's of Omeiza et al.;
    alpha is used only where ReLU(D1) > 0, and ``a`` is non-negative as the paper assumes."""
    assert bool((a >= 0).all())
    dims = tuple(range(1, a.ndim))
    s = a.sum(dim=dims).reshape((-1,) + (1,) * (a.ndim - 1))
    pos = d1 > 0
    alpha = torch.where(pos, d2 / torch.where(pos, 2 * d2 + s * d3, 1.0), 0.0)
    return (alpha * d1.clamp_min(0)).sum(dim=dims)


def _noisy_copies(x: Tensor, n: int, noise: float, seed: int) -> Tensor:
    """The plugin's draw, ``(N, n, ...)``: one ``randn((n, ...))`` from a generator seeded with
    ``seed``, the same n draws for every sample, scaled by sigma_i = noise * (max x_i - min x_i)."""
    eps = torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
    copies = []
    for i in range(x.shape[0]):
        sigma = noise * (x[i].max() - x[i].min())
        copies.append(torch.stack([x[i] + sigma * eps[t] for t in range(n)]))
    return torch.stack(copies)


@pytest.mark.parametrize("n_samples", [1, 2, 4])
def test_smoothgradcampp_without_noise_is_gradcampp(n_samples: int) -> None:
    # identical copies give D_p = g^p exactly (means of 1, 2 or 4 equal floats are exact)
    model = SquareHead(SQ_W).eval()
    x = _square_input()
    kw = {"layer": "layer", "target": [0, 2], **SIGNED}
    pp = camkit.explain(model, x, "gradcampp", **kw)
    smooth = camkit.explain(model, x, "smoothgradcampp", noise=0.0, n_samples=n_samples, **kw)
    assert torch.equal(smooth.weights, pp.weights)
    assert torch.equal(smooth.raw, pp.raw)
    # and Grad-CAM++ here is the hand formula with g = 2 W[c] * A
    for i, c in enumerate([0, 2]):
        g = 2 * SQ_W[c].reshape(2, 2, 2) * x[i]
        torch.testing.assert_close(pp.weights[i], _paper_gradcampp(x[i], g, g * g, g * g * g))


@pytest.mark.parametrize(("n_samples", "noise", "batch_size"), [(3, 0.2, 64), (5, 0.5, 4)])
def test_smoothgradcampp_matches_a_loop_over_noisy_copies(
    n_samples: int, noise: float, batch_size: int
) -> None:
    model = SquareHead(SQ_W).eval()
    x = _square_input()
    target = [1, 0]
    res = camkit.explain(
        model,
        x,
        "smoothgradcampp",
        layer="layer",
        target=target,
        n_samples=n_samples,
        noise=noise,
        seed=11,
        batch_size=batch_size,
        **SIGNED,
    )
    noisy = _noisy_copies(x, n_samples, noise, seed=11)
    for i, c in enumerate(target):
        # the gradient of y = W[c] . vec(A^2) at a noisy copy is 2 W[c] * A_noisy
        gs = [2 * SQ_W[c].reshape(2, 2, 2) * noisy[i, t] for t in range(n_samples)]
        g = torch.stack(gs).double()
        d1, d2, d3 = g.mean(0), (g**2).mean(0), (g**3).mean(0)
        w = _paper_gradcampp(x[i].double(), d1, d2, d3)
        torch.testing.assert_close(res.weights[i].double(), w, rtol=1e-5, atol=1e-6)
        raw = (w[:, None, None] * x[i].double()).sum(0)
        torch.testing.assert_close(res.raw[i].double(), raw, rtol=1e-5, atol=1e-6)
    # the noise changed the weights
    pp = camkit.explain(model, x, "gradcampp", layer="layer", target=target, **SIGNED)
    assert not torch.allclose(res.weights, pp.weights, rtol=1e-3)


# With strong noise the averaged cube D3 can be negative where D1 > 0 (sample 0, class 1,
# n_samples=3, noise=1.0, seed=4): at channel 1, position (1, 0), the three gradients are
# 6.7053, -7.5480, 2.4460, so D1 = 0.5344, D2 = 35.972, D3 = -37.976, and with
# S = sum A = 2.9391 the denominator 2 D2 + S D3 = -39.670: alpha = -0.9068 by the equation.
NEG = {"n_samples": 3, "noise": 1.0, "seed": 4}


def _negative_denominator_case() -> tuple[Tensor, Tensor, Tensor]:
    """camkit's weights for sample 0 and the paper's, and where D1 > 0 >= the denominator."""
    model = SquareHead(SQ_W).eval()
    x = _square_input()
    res = camkit.explain(model, x, "smoothgradcampp", layer="layer", target=[1, 0], **NEG)
    noisy = _noisy_copies(x, NEG["n_samples"], NEG["noise"], NEG["seed"])
    g = torch.stack([2 * SQ_W[1].reshape(2, 2, 2) * noisy[0, t] for t in range(3)]).double()
    d1, d2, d3 = g.mean(0), (g**2).mean(0), (g**3).mean(0)
    s = x[0].double().sum(dim=(1, 2))[:, None, None]
    bad = (d1 > 0) & (2 * d2 + s * d3 <= 0)
    return res.weights[0].double(), _paper_gradcampp(x[0].double(), d1, d2, d3), bad


def test_smoothgradcampp_negative_denominator_case() -> None:
    got, paper, bad = _negative_denominator_case()
    assert bad.nonzero().tolist() == [[1, 1, 0]]
    # channel 0 has no such position: camkit and the equation agree there
    torch.testing.assert_close(got[0], paper[0], rtol=1e-5, atol=1e-7)


def test_smoothgradcampp_zeroes_alpha_where_the_denominator_is_not_positive() -> None:
    # the documented rule: alpha = 0 where 2 D2 + max(sum A, 0) D3 <= 0, so the pixel at
    # channel 1, (1, 0) contributes nothing; the equation would give it alpha = -0.9068 and the
    # channel weight -0.1758
    model = SquareHead(SQ_W).eval()
    x = _square_input()
    res = camkit.explain(model, x, "smoothgradcampp", layer="layer", target=[1, 0], **NEG)
    noisy = _noisy_copies(x, NEG["n_samples"], NEG["noise"], NEG["seed"])
    g = torch.stack([2 * SQ_W[1].reshape(2, 2, 2) * noisy[0, t] for t in range(3)]).double()
    d1, d2, d3 = g.mean(0), (g**2).mean(0), (g**3).mean(0)
    s = x[0].double().sum(dim=(1, 2))[:, None, None].clamp_min(0)
    denom = 2 * d2 + s * d3
    alpha = torch.where(denom > 0, d2 / torch.where(denom > 0, denom, 1.0), 0.0)
    expected = (alpha * d1.clamp_min(0)).sum(dim=(1, 2))
    torch.testing.assert_close(res.weights[0].double(), expected, rtol=1e-5, atol=1e-7)
    assert float(expected[1]) == pytest.approx(0.3087, abs=1e-4)


def test_smoothgradcampp_is_reproducible_for_a_seed() -> None:
    # features.2 is the conv before the last ReLU: its gradient depends on the input (at
    # features, just before average pooling, it is W_fc / P whatever the noise)
    model = TinyCNN(seed=0).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    kw = {"layer": "features.2", "target": [0, 1], "n_samples": 3, **SIGNED}
    a = camkit.explain(model, x, "smoothgradcampp", seed=1, **kw)
    b = camkit.explain(model, x, "smoothgradcampp", seed=1, **kw)
    c = camkit.explain(model, x, "smoothgradcampp", seed=2, **kw)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.raw, b.raw)
    assert not torch.allclose(a.weights, c.weights)
    # a sample gets the same noise, so the same map, alone and in a batch
    alone = camkit.explain(model, x[1:], "smoothgradcampp", seed=1, **{**kw, "target": [1]})
    torch.testing.assert_close(alone.weights[0], a.weights[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alone.raw[0], a.raw[1], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# resnet18 (random init) against float64 references of the papers' equations
# ---------------------------------------------------------------------------------------------

# at layer4 (followed by average pooling and fc) the gradient is the same at every position;
# at layer2 it varies across space
LAYERS = ("layer4", "layer2")
TARGETS = [3, 7]  # different classes for the two samples
SMOOTH = {"n_samples": 3, "noise": 0.15, "seed": 5}
RANDOM_SEED = 0


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, torch.nn.Module, Tensor]:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)  # layer4: 512 x 3 x 3, layer2: 128 x 12 x 12
    return model, copy.deepcopy(model).double(), x


def _capture64(model64: torch.nn.Module, layer: str, x1: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Float64 activation and gradient of y[c] at ``layer`` for one sample, full graph."""
    module = dict(model64.named_modules())[layer]
    store: dict[str, Tensor] = {}

    def keep(mod: torch.nn.Module, args: object, out: Tensor) -> None:
        out.retain_grad()
        store["a"] = out

    handle = module.register_forward_hook(keep)
    try:
        y = model64(x1.double())[0, c]
        y.backward()
    finally:
        handle.remove()
    model64.zero_grad(set_to_none=True)
    grad = store["a"].grad
    assert grad is not None
    return store["a"][0].detach(), grad[0]


@pytest.fixture(scope="module")
def resnet_ref(resnet: tuple[torch.nn.Module, torch.nn.Module, Tensor]) -> dict:
    _, model64, x = resnet
    return {
        layer: [_capture64(model64, layer, x[i : i + 1], c) for i, c in enumerate(TARGETS)]
        for layer in LAYERS
    }


def _pca_map(v: Tensor, center: bool = True) -> Tensor:
    """First principal component of ``v`` (C, *S) over positions, from a singular value
    decomposition (not the Gram matrices camkit uses): the projection X v_1 on the first right
    singular vector, oriented to correlate positively with the channel sum; ``center=False`` is
    the paper's uncentred projection."""
    x = v.flatten(1).T  # (P, C)
    if center:
        x = x - x.mean(0)
    _, sigma, vh = torch.linalg.svd(x, full_matrices=False)
    assert float(sigma[0]) > 1.025 * float(sigma[1]), "first component not well separated"
    proj = x @ vh[0]
    plain = v.sum(0).flatten()
    if float(torch.dot(proj - proj.mean(), plain - plain.mean())) < 0:
        proj = -proj
    return proj.reshape(v.shape[1:])


def _reference(method: str, a: Tensor, g: Tensor, c: int, fc: Tensor) -> Tensor:
    """The paper's signed map (before ReLU) for one sample, float64, ``a`` and ``g`` (C, H, W)."""
    assert bool((a >= 0).all())  # resnet blocks end in a ReLU
    s = a.sum(dim=(1, 2))
    if method == "cam":  # Zhou et al. eq. 2
        w = fc[c]
    elif method == "gradcampp":  # Chattopadhay et al. eq. 19
        w = _paper_gradcampp(a, g, g**2, g**3)
    elif method == "xgradcam":  # Fu et al. eq. 8, 0 for a channel that is all zero
        w = torch.where(s != 0, (a * g).sum(dim=(1, 2)) / torch.where(s != 0, s, 1.0), 0.0)
    elif method == "hirescam":  # Draelos & Carin eq. 4
        return (g * a).sum(0)
    elif method == "gradcam-elementwise":
        return (g * a).clamp_min(0).sum(0)
    elif method == "layercam":  # Jiang et al. eq. 5-6
        return (g.clamp_min(0) * a).sum(0)
    elif method == "eigencam":
        return _pca_map(a)
    elif method == "eigengradcam":
        return _pca_map(g * a)
    elif method == "random":
        w = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(RANDOM_SEED)).double()
    else:
        raise AssertionError(method)
    return (w[:, None, None] * a).sum(0)


def _assert_matches(
    raw: Tensor, ref: list[Tensor], rel: float = 1e-3, positive: bool = True
) -> None:
    """``raw`` (N, H, W) against per-sample references: correlation above 0.999 and error below
    ``rel`` times the map's largest magnitude; the maps vary and (``positive``) are non-blank
    after ReLU, and the two samples' maps differ."""
    assert raw.shape == (len(ref), *ref[0].shape)
    for i, e in enumerate(ref):
        r = raw[i].double().flatten()
        e = e.flatten()
        scale = float(e.abs().max())
        assert float(e.max() - e.min()) > 0, f"constant map {i}"
        assert not positive or float(e.max()) > 0, f"map {i} is blank after ReLU"
        corr = float(torch.corrcoef(torch.stack([r, e]))[0, 1])
        assert corr > 0.999, f"sample {i}: correlation {corr}"
        err = float((r - e).abs().max())
        assert err <= rel * scale, f"sample {i}: max error {err} vs map max {scale}"
    assert not torch.allclose(raw[0], raw[1])
    assert not positive or all(float(raw[i].clamp_min(0).max()) > 0 for i in range(len(ref)))


PLAIN = [m for m in METHODS if m != "smoothgradcampp"]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", PLAIN)
def test_resnet18_matches_float64_reference(
    method: str,
    layer: str,
    resnet: tuple[torch.nn.Module, torch.nn.Module, Tensor],
    resnet_ref: dict,
) -> None:
    model, model64, x = resnet
    kw = {"layer": layer, "target": TARGETS, "relu": False, "normalize": False, "upsample": None}
    if method == "cam" and layer != "layer4":
        # layer2 is followed by more blocks, not by pooling and the classifier
        with pytest.raises(camkit.LayerError):
            camkit.explain(model, x, method, **kw)
        return
    extra = {"seed": RANDOM_SEED} if method == "random" else {}
    res = camkit.explain(model, x, method, **kw, **extra)
    assert torch.equal(res.targets, torch.tensor(TARGETS))
    fc = model64.fc.weight.detach()
    ref = [
        _reference(method, a, g, c, fc)
        for (a, g), c in zip(resnet_ref[layer], TARGETS, strict=True)
    ]
    _assert_matches(res.raw, ref)
    # the default output: ReLU, normalised to [0, 1], upsampled; every sample non-blank
    maps = camkit.explain(model, x, method, layer=layer, target=TARGETS, **extra).maps
    assert maps.shape == (2, 96, 96)
    assert torch.equal(maps.flatten(1).amax(1), torch.ones(2))


@pytest.mark.parametrize("layer", LAYERS)
def test_resnet18_smoothgradcampp_matches_float64_loop(
    layer: str, resnet: tuple[torch.nn.Module, torch.nn.Module, Tensor], resnet_ref: dict
) -> None:
    model, model64, x = resnet
    res = camkit.explain(
        model,
        x,
        "smoothgradcampp",
        layer=layer,
        target=TARGETS,
        relu=False,
        normalize=False,
        upsample=None,
        **SMOOTH,
    )
    n = SMOOTH["n_samples"]
    noisy = _noisy_copies(x, n, SMOOTH["noise"], SMOOTH["seed"])
    ref = []
    for i, c in enumerate(TARGETS):
        a = resnet_ref[layer][i][0]  # the clean activation
        g = torch.stack([_capture64(model64, layer, noisy[i, t : t + 1], c)[1] for t in range(n)])
        w = _paper_gradcampp(a, g.mean(0), (g**2).mean(0), (g**3).mean(0))
        ref.append((w[:, None, None] * a).sum(0))
    _assert_matches(res.raw, ref)


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_resnet18_eigen_uncentred_matches_float64_reference(
    method: str,
    layer: str,
    resnet: tuple[torch.nn.Module, torch.nn.Module, Tensor],
    resnet_ref: dict,
) -> None:
    model, _, x = resnet
    res = camkit.explain(
        model, x, method, layer=layer, target=TARGETS, center=False, upsample=None, **SIGNED
    )
    values = [a if method == "eigencam" else g * a for a, g in resnet_ref[layer]]
    ref = [_pca_map(v, center=False) for v in values]
    # the uncentred projection of g * A at layer4 is negative everywhere for sample 1 under the
    # documented sign rule (blank after ReLU), so only the signed maps are compared
    _assert_matches(res.raw, ref, positive=method == "eigencam")


def test_resnet18_class_discriminative_flags(
    resnet: tuple[torch.nn.Module, torch.nn.Module, Tensor],
) -> None:
    model, _, x = resnet
    registry = camkit.default_registry()
    for method in METHODS:
        kw = {"layer": "layer4" if method == "cam" else "layer2", **SIGNED}
        if method == "smoothgradcampp":
            kw["n_samples"] = 2
        a = camkit.explain(model, x[:1], method, target=3, **kw).raw
        b = camkit.explain(model, x[:1], method, target=7, **kw).raw
        assert registry.get(method).class_discriminative == (not torch.equal(a, b)), method


# ---------------------------------------------------------------------------------------------
# conformance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_passes_conformance_checks(method: str) -> None:
    if method == "cam":  # needs global average pooling and a linear head, as documented
        check_method(method, model_factory=lambda dims: TinyCNN(dims=dims, seed=dims))
    else:
        check_method(method)
