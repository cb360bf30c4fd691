"""Options: defaults, validation, per-method options, per-call overrides."""

from __future__ import annotations

import pytest
import torch

import camkit
from camkit.options import COMMON_OPTIONS, resolve_options
from camkit.toy import TinyCNN


def test_defaults_are_the_documented_table() -> None:
    assert dict(COMMON_OPTIONS) == {
        "relu": True,
        "normalize": True,
        "upsample": "auto",
        "batch_size": "auto",
        "progress": None,
        "seed": 0,
        "aug_smooth": False,
        "eigen_smooth": False,
        "reshape": None,
        "output": None,
        "model_kwargs": None,
        "differentiable": False,
        "image_key": None,
        "spatial_dims": None,
    }
    opts = resolve_options("m", {"extra": 3}, {"seed": 5})
    assert opts["extra"] == 3 and opts["seed"] == 5 and opts["relu"] is True


@pytest.mark.parametrize(
    "given,message",
    [
        ({"relu": 1}, "'relu' expects True or False"),
        ({"batch_size": 0}, "'batch_size' expects 'auto' or a positive int"),
        ({"seed": 1.5}, "'seed' expects an int"),
        ({"reshape": 3}, "'reshape' expects a callable"),
        ({"model_kwargs": [1]}, "'model_kwargs' expects a mapping"),
        ({"output": 1.5}, "'output' expects an index"),
        ({"progress": "yes"}, "'progress' expects True or False"),
        ({"aug_smooth": "yes"}, "'aug_smooth' expects True, False"),
        ({"relus": True}, "unknown option 'relus'.*Did you mean 'relu'"),
    ],
)
def test_bad_values(given: dict[str, object], message: str) -> None:
    with pytest.raises(camkit.OptionError, match=message):
        resolve_options("gradcam", {}, given)


def test_per_call_override() -> None:
    model = TinyCNN().eval()
    x = torch.randn(1, 3, 8, 8)
    ex = camkit.Explainer(model, normalize=False)
    a = ex(x, target=0)
    b = ex(x, target=0, normalize=True)
    assert float(a.maps.max()) != 1.0 and float(b.maps.max()) == 1.0
    assert ex.options["normalize"] is False
    with pytest.raises(camkit.OptionError, match="unknown option"):
        ex(x, nope=1)


def test_reshape_output_and_model_kwargs() -> None:
    class Tokens(torch.nn.Module):
        """(N, 3, 4, 4) -> tokens (N, 16, 3) -> dict of logits; `scale` passed as a kwarg."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(3, 3)
            self.fc = torch.nn.Linear(3, 2)
            with torch.no_grad():
                self.embed.weight.copy_(torch.eye(3))
                self.embed.bias.zero_()
                self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
                self.fc.bias.zero_()

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
            tokens = self.embed(x.flatten(2).transpose(1, 2))  # (N, 16, 3)
            return {"aux": tokens.sum(), "scores": scale * self.fc(tokens.mean(1))}

    def to_map(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], 3, 4, 4)

    x = torch.rand(1, 3, 4, 4)
    res = camkit.explain(
        Tokens(),
        x,
        layer="embed",
        target=1,
        reshape=to_map,
        output="scores",
        model_kwargs={"scale": 2.0},
        normalize=False,
        relu=False,
    )
    # score = 2 * mean over tokens of channel 2: gradient 2/16 on channel 2 only
    torch.testing.assert_close(res.weights, torch.tensor([[0.0, 0.0, 0.125]]))
    torch.testing.assert_close(res.raw, 0.125 * x[:, 2])
    torch.testing.assert_close(res.scores, 2.0 * x[:, 2].mean((1, 2)))
    picked = camkit.explain(
        Tokens(),
        x,
        layer="embed",
        target=1,
        reshape=to_map,
        output=lambda out: out["scores"],
        normalize=False,
        relu=False,
    )
    torch.testing.assert_close(picked.raw, 0.0625 * x[:, 2])


def test_eigen_smooth_changes_the_combination() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    plain = camkit.explain(model, x, target=[0, 1], relu=False, normalize=False)
    eig = camkit.explain(model, x, target=[0, 1], relu=False, normalize=False, eigen_smooth=True)
    assert not torch.allclose(plain.raw, eig.raw)
    corr = torch.corrcoef(torch.stack([plain.raw[0].flatten(), eig.raw[0].flatten()]))[0, 1]
    assert corr > 0  # the sign rule: positively correlated with the plain weighted sum


def test_aug_smooth_is_the_mean_of_mapped_back_copies() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    res = camkit.explain(model, x, target=[0, 1], aug_smooth=True, relu=False)
    parts = []
    for flip in (False, True):
        for factor in (1.0, 0.9, 1.1):
            xi = (x.flip(-1) if flip else x) * factor
            r = camkit.explain(model, xi, target=[0, 1], relu=False)
            parts.append((r.maps.flip(-1) if flip else r.maps, r.raw.flip(-1) if flip else r.raw))
    mean = torch.stack([m for m, _ in parts]).mean(0)
    lo = mean.flatten(1).min(1).values[:, None, None]
    hi = mean.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(res.maps, (mean - lo) / (hi - lo))
    torch.testing.assert_close(res.raw, torch.stack([r for _, r in parts]).mean(0))
    plain = camkit.explain(model, x, target=[0, 1], relu=False)
    assert torch.equal(res.scores, plain.scores) and not torch.allclose(res.maps, plain.maps)
    # None explains the class predicted on the original inputs in every copy
    auto = camkit.explain(model, x, aug_smooth=True)
    assert torch.equal(auto.targets, model(x).argmax(1))
    only_scale = camkit.explain(model, x, target=[0, 1], aug_smooth=("scale",), relu=False)
    scaled = torch.stack([p[0] for p in parts[:3]]).mean(0)
    lo = scaled.flatten(1).min(1).values[:, None, None]
    hi = scaled.flatten(1).max(1).values[:, None, None]
    torch.testing.assert_close(only_scale.maps, (scaled - lo) / (hi - lo))


def test_aug_smooth_errors_where_it_does_not_apply() -> None:
    with pytest.raises(camkit.OptionError, match=r"'hflip'.*aug_smooth=\('scale',\)"):
        camkit.explain(TinyCNN(dims=1), torch.randn(1, 3, 16), aug_smooth=True)
    res = camkit.explain(TinyCNN(dims=1), torch.randn(1, 3, 16), aug_smooth=("scale",))
    assert res.maps.shape == (1, 16)

    class Embed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.conv = torch.nn.Conv1d(4, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h = self.conv(self.emb(ids[:, 0]).transpose(1, 2))
            return self.fc(h.mean(2))

    ids = torch.randint(0, 10, (1, 1, 6))
    with pytest.raises(camkit.OptionError, match="floating-point"):
        camkit.explain(Embed(), ids, layer="conv", aug_smooth=("scale",))
    with pytest.raises(camkit.OptionError, match="aug_smooth"):
        camkit.explain(Embed(), ids, layer="conv", aug_smooth=("rotate",))


def test_aug_smooth_with_callable_target_needs_index() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(camkit.TargetError, match="must accept"):
        camkit.explain(model, x, target=lambda out: out[:, 0], aug_smooth=True)
    res = camkit.explain(model, x, target=lambda out, index: out[:, 0], aug_smooth=True)
    ref = camkit.explain(model, x, target=0, aug_smooth=True)
    torch.testing.assert_close(res.maps, ref.maps)
