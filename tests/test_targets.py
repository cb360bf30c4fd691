"""Targets: None, ints, sequences, tensors, callables and target objects."""

from __future__ import annotations

import pytest
import torch
from helpers import FlattenHead

import camkit
from camkit.targets import ClassTarget, FunctionTarget, as_target

LOGITS = torch.tensor([[0.0, 3.0, 1.0], [5.0, -1.0, 2.0]])
ROWS = torch.arange(2)


def test_none_is_argmax() -> None:
    t, classes = as_target(None, LOGITS, 2)
    assert torch.equal(classes, torch.tensor([1, 0]))
    assert torch.equal(t.scores(LOGITS, ROWS), torch.tensor([3.0, 5.0]))


@pytest.mark.parametrize("spec", [2, [2, 2], (2, 2), torch.tensor([2, 2]), torch.tensor(2)])
def test_int_and_sequences(spec: object) -> None:
    t, classes = as_target(spec, LOGITS, 2)
    assert torch.equal(classes, torch.tensor([2, 2]))
    assert torch.equal(t.scores(LOGITS, ROWS), torch.tensor([1.0, 2.0]))


def test_class_target_follows_index_for_copies() -> None:
    t = ClassTarget(torch.tensor([1, 2]))
    copies = torch.tensor([[0.0, 7.0, 8.0], [0.0, 9.0, 10.0], [0.0, 11.0, 12.0]])
    assert torch.equal(t.scores(copies, torch.tensor([1, 0, 1])), torch.tensor([8.0, 9.0, 12.0]))


def test_callables() -> None:
    one = FunctionTarget(lambda out: out[:, 0] - out[:, 1])
    assert torch.equal(one.scores(LOGITS, ROWS), torch.tensor([-3.0, 6.0]))
    with pytest.raises(camkit.TargetError, match="must accept"):
        one.scores(LOGITS, torch.tensor([0, 0]))
    two = FunctionTarget(lambda out, index: out[:, 2] * (index + 1))
    assert torch.equal(two.scores(LOGITS, torch.tensor([1, 1])), torch.tensor([2.0, 4.0]))
    bad = FunctionTarget(lambda out: out.sum())
    with pytest.raises(camkit.TargetError, match=r"shape \(2,\)"):
        bad.scores(LOGITS, ROWS)


def test_errors() -> None:
    with pytest.raises(camkit.TargetError, match="3 entries for a batch of 2"):
        as_target([0, 1, 2], LOGITS, 2)
    with pytest.raises(camkit.TargetError, match=r"\[0, 2\].*\[3\]"):
        as_target([0, 3], LOGITS, 2)
    with pytest.raises(camkit.TargetError, match=r"\[-1\]"):
        as_target(-1, LOGITS, 2)
    with pytest.raises(camkit.TargetError, match="float"):
        as_target([0.5, 1.0], LOGITS, 2)
    with pytest.raises(camkit.TargetError, match="bool"):
        as_target(True, LOGITS, 2)
    with pytest.raises(camkit.TargetError, match="got str"):
        as_target("cat", LOGITS, 2)
    with pytest.raises(camkit.TargetError, match=r"\(N, K\)"):
        as_target(1, torch.zeros(2, 3, 4), 2)


def test_target_object_and_callable_in_explain() -> None:
    a = torch.arange(16, dtype=torch.float32).reshape(2, 2, 2, 2)
    w = torch.eye(8)[:3]
    model = FlattenHead(a, w).eval()
    x = torch.zeros(2, 1, 2, 2)

    class Difference:
        def scores(self, output: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            return output[:, 1] - output[:, 0]

    # the weights are zero (below): blank maps, and said so
    with pytest.warns(camkit.BlankMapWarning, match="constant for 2 of 2"):
        res = camkit.explain(
            model, x, layer="layer", target=Difference(), relu=False, normalize=False
        )
    assert res.targets is None
    assert torch.equal(res.scores, torch.tensor([1.0, 1.0]))
    # gradient -1 at position (0,0,0), +1 at (0,0,1): channel 0 mean 0, channel 1 mean 0
    assert torch.equal(res.weights, torch.zeros(2, 2))
    res2 = camkit.explain(
        model, x, layer="layer", target=lambda out: out[:, 2], relu=False, normalize=False
    )
    assert torch.equal(res2.weights, torch.tensor([[0.25, 0.0], [0.25, 0.0]]))
    assert torch.equal(res2.scores, torch.tensor([2.0, 10.0]))


# -- what a target says about its classes ---------------------------------------------------
def test_targets_say_which_class_each_sample_scores() -> None:
    from camkit.targets import DifferenceTarget, LogitsTarget, ProbabilityTarget

    assert torch.equal(
        ClassTarget(torch.tensor([2, 0, 1])).class_indices(3), torch.tensor([2, 0, 1])
    )
    # one class for all samples, or one per sample
    assert torch.equal(ProbabilityTarget(1).class_indices(3), torch.tensor([1, 1, 1]))
    assert torch.equal(ProbabilityTarget([0, 2]).class_indices(2), torch.tensor([0, 2]))
    # a difference of two classes scores no single class
    assert DifferenceTarget(1, 2).class_indices(3) is None
    for t in (ProbabilityTarget(1), DifferenceTarget(1, 2)):
        assert isinstance(t, LogitsTarget) and not isinstance(t, ClassTarget)
    with pytest.raises(camkit.TargetError, match=r"2 classes for a batch of 3"):
        ProbabilityTarget([0, 2]).class_indices(3)


def test_cam_with_a_difference_target_is_a_clear_error() -> None:
    from camkit.toy import TinyCNN

    model = TinyCNN().eval()
    x = torch.randn(3, 3, 8, 8)
    with pytest.raises(camkit.TargetError, match=r"CAM.*DifferenceTarget.*gradcam"):
        camkit.explain(model, x, method="cam", target=camkit.plugin.DifferenceTarget(1, 2))
    # Grad-CAM explains the difference: its maps are those of class 1's minus class 2's weights
    res = camkit.explain(
        model, x, target=camkit.plugin.DifferenceTarget(1, 2), relu=False, normalize=False
    )
    one = camkit.explain(model, x, target=1, relu=False, normalize=False)
    two = camkit.explain(model, x, target=2, relu=False, normalize=False)
    torch.testing.assert_close(res.weights, one.weights - two.weights)
    torch.testing.assert_close(res.raw, one.raw - two.raw)
    # Score-CAM's probability target: one class for the batch, or the same class per sample
    prob = camkit.explain(model, x, method="scorecam", target=camkit.plugin.ProbabilityTarget(1))
    per = camkit.explain(
        model, x, method="scorecam", target=camkit.plugin.ProbabilityTarget([1] * 3)
    )
    torch.testing.assert_close(prob.maps, per.maps)
