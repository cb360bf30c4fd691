"""Never a silent wrong map, never a raw traceback: one test per failure found by trying to
break camkit (a perturbed forward shown to the caller, ambiguous layouts, non-finite values,
blank maps without a reason, guided backpropagation's corner cases, compiled models, raw
internal errors, memory driven by options, state changed by a probe, plugin loading)."""

from __future__ import annotations

import copy
import io
import math
import warnings
from typing import Any

import pytest
import torch
from helpers import assert_unchanged, snapshot
from torch import Tensor, nn

import camkit
from camkit.toy import TinyCNN

X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class BNNet(nn.Module):
    """conv -> batch norm -> ReLU -> mean -> linear; batch norm has running statistics."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


# -- 1. the explained forward is the unperturbed one -----------------------------------------
def test_ablationcam_caller_sees_the_unperturbed_forward() -> None:
    model = TinyCNN().eval()
    expected = model(X).detach()
    seen: list[Tensor] = []
    handle = model.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        res = camkit.explain(model, X, method="ablationcam", layer="features")
    finally:
        handle.remove()
    full = [o for o in seen if o.shape[0] == X.shape[0]]
    # the first forward of the whole batch is the explained one: exactly the model's output
    assert full and torch.equal(full[0], expected)
    assert torch.equal(res.targets, expected.argmax(1))
    torch.testing.assert_close(res.scores, expected.gather(1, res.targets[:, None])[:, 0])


# -- 2. a layout the shape cannot settle is decided by the module, or refused -----------------
class ChannelsLast(nn.Module):
    """A patch embedding, then a channels-last stage whose output ``(N, 8, 8, 8)`` fits both
    layouts at 32 x 32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.stage = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())
        self.act = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.stage(self.embed(x).permute(0, 2, 3, 1)))
        out: Tensor = self.head(a.mean((1, 2)))
        return out


class ChannelsFirstTwin(ChannelsLast):
    """The same model, whose ``cf`` turns the stage's output channels first: explaining ``cf``
    here is explaining ``stage`` there, read channels last."""

    def __init__(self) -> None:
        super().__init__()
        self.cf = ToChannelsFirst()

    def forward(self, x: Tensor) -> Tensor:
        a = self.act(self.cf(self.stage(self.embed(x).permute(0, 2, 3, 1))))
        out: Tensor = self.head(a.mean((2, 3)))
        return out


class ToChannelsFirst(nn.Module):
    """A permutation that says what it does (``dims``, as torchvision's ``Permute``)."""

    dims = (0, 3, 1, 2)

    def forward(self, a: Tensor) -> Tensor:
        return a.permute(*self.dims)


X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _channels_last(a: Tensor) -> Tensor:
    return a.permute(0, 3, 1, 2)


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_ambiguous_channels_last_is_read_by_the_module(method: str) -> None:
    model = ChannelsLast().eval()
    assert tuple(model.stage(model.embed(X32).permute(0, 2, 3, 1)).shape) == (2, 8, 8, 8)
    got = camkit.explain(model, X32, method=method, layer="stage")
    ref = camkit.explain(ChannelsFirstTwin().eval(), X32, method=method, layer="cf")
    torch.testing.assert_close(got.maps, ref.maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.weights, ref.weights, atol=1e-6, rtol=0)
    assert got.weights.shape == (2, 8)


def test_ambiguous_channels_first_is_read_by_the_module() -> None:
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = camkit.explain(model, x, layer="features")  # (2, 16, 16, 16)
    ref = camkit.explain(model, x, layer="features", reshape=lambda a: a)
    torch.testing.assert_close(got.maps, ref.maps, atol=0, rtol=0)


def test_ambiguous_layout_without_a_telling_module_is_refused() -> None:
    with pytest.raises(camkit.LayerError, match=r"(?s)'act'.*\(2, 8, 8, 8\).*reshape"):
        camkit.explain(ChannelsLast(), X32, layer="act")
    got = camkit.explain(ChannelsLast(), X32, layer="act", reshape=_channels_last)
    assert got.maps.shape == (2, 32, 32)


def test_the_layer_search_passes_over_a_layer_whose_layout_is_not_told() -> None:
    # `act` (a bare GELU) finishes last but fits both layouts: the search takes `stage`, read
    # channels last, and gives what explaining `stage` gives
    model = ChannelsLast().eval()
    got = camkit.explain(model, X32)
    assert got.layer == "stage"
    ref = camkit.explain(model, X32, layer="stage")
    torch.testing.assert_close(got.maps, ref.maps, atol=0, rtol=0)
    infos = {info.name: info for info in camkit.layers(model, X32)}
    assert not infos["act"].candidate and infos["stage"].candidate


@pytest.mark.slow
def test_swin_t_at_384_reads_features_1_as_channels_last() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.swin_t(weights=None).eval()
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    got = camkit.explain(model, x, layer="features.1")
    ref = camkit.explain(model, x, layer="features.1", reshape=_channels_last)
    torch.testing.assert_close(got.maps, ref.maps, atol=1e-5, rtol=0)


# -- 3. non-finite values never become a blank map -------------------------------------------
class _Weights(camkit.Method):
    """Weights given by ``make(activations)``; ``combine`` by ``mix`` when given."""

    needs_gradients = False

    def __init__(self, name: str, make: Any, mix: Any = None) -> None:
        self.name = name
        self.make = make
        self.mix = mix

    def weights(self, ctx: camkit.Context) -> Tensor:
        w: Tensor = self.make(ctx.activations)
        return w

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        if self.mix is None:
            return super().combine(ctx, weights)
        out: Tensor = self.mix(ctx.activations)
        return out


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda a: torch.full(a.shape[:2], math.nan), "non-finite"),
        (lambda a: torch.full(a.shape[:2], math.inf), "non-finite"),
        (lambda a: torch.ones(a.shape[:2], device="meta"), "device"),
        (lambda a: torch.ones(a.shape[:2], dtype=torch.int64), "dtype"),
    ],
    ids=["nan", "inf", "meta", "int"],
)
def test_bad_weights_name_the_method(make: Any, what: str) -> None:
    with pytest.raises(camkit.PluginError, match=rf"(?s)'badweights'.*{what}"):
        camkit.explain(TinyCNN(), X, method=_Weights("badweights", make), layer="features")


def test_non_finite_combine_names_the_method() -> None:
    method = _Weights(
        "nancombine",
        lambda a: torch.ones(a.shape[:2]),
        lambda a: torch.full((a.shape[0], *a.shape[2:]), math.nan),
    )
    with pytest.raises(camkit.PluginError, match=r"(?s)'nancombine'.*non-finite"):
        camkit.explain(TinyCNN(), X, method=method, layer="features")


def test_reshape_giving_nan_names_the_option() -> None:
    with pytest.raises(camkit.CamkitError, match=r"(?s)reshape.*non-finite"):
        camkit.explain(TinyCNN(), X, layer="features", reshape=lambda a: a * math.nan)


def test_sscam_std_nan_is_refused() -> None:
    with pytest.raises(camkit.OptionError, match="std"):
        camkit.explain(TinyCNN(), X, method="sscam", std=math.nan, n_samples=2)
    with pytest.raises(camkit.OptionError, match="std"):
        camkit.explain(TinyCNN(), X, method="sscam", std=math.inf, n_samples=2)


class NaNOnMasked(nn.Module):
    """TinyCNN whose output is NaN for any input other than the explained batch."""

    def __init__(self, x: Tensor) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.x = x

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        if x.shape != self.x.shape or not torch.equal(x, self.x):
            out = out * math.nan
        return out


@pytest.mark.parametrize("method", ["scorecam", "iscam", "sscam"])
def test_non_finite_scores_inside_the_loops_name_the_method(method: str) -> None:
    opts = {} if method == "scorecam" else {"n_samples": 2}
    with pytest.raises(camkit.CamkitError, match=rf"(?s){method}.*not finite"):
        camkit.explain(NaNOnMasked(X), X, method=method, layer="net.features", **opts)


class NaNOnAblated(nn.Module):
    """NaN output whenever a channel of the layer is zero everywhere (an ablated copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: Tensor) -> Tensor:
        a = self.net.features(x)
        dead = (a.flatten(2).amax(2) == 0).any(1)  # (N,)
        out: Tensor = self.net.head(a)
        return torch.where(dead[:, None], math.nan, out)


def test_non_finite_scores_in_ablationcam_name_the_method() -> None:
    model = NaNOnAblated()
    with pytest.raises(camkit.CamkitError, match=r"(?s)ablationcam.*not finite"):
        camkit.explain(model, X, method="ablationcam", layer="net.features")


# -- 4. a blank map comes with a warning naming the reason -----------------------------------
class ZeroHead(nn.Module):
    """TinyCNN's features and a zero-initialised classifier: the score ignores the layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = TinyCNN().features
        self.fc = nn.Linear(16, 3)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.features(x).mean((2, 3)))
        return out


def test_zero_gradient_warns_with_the_layer_and_what_to_try() -> None:
    with pytest.warns(camkit.CamkitWarning, match=r"(?s)'features'.*gradient.*zero.*2 of 2"):
        res = camkit.explain(ZeroHead(), X, layer="features")
    assert float(res.maps.abs().max()) == 0.0


class DeadLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()
        self.dead = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        a = self.dead(self.net.features(x) - 1e6)  # all zero after the ReLU
        out: Tensor = self.net.head(a) + x.mean()
        return out


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "eigencam"])
def test_dead_layer_warns(method: str) -> None:
    with pytest.warns(camkit.CamkitWarning, match=r"(?s)'dead'.*activations are all zero"):
        res = camkit.explain(DeadLayer(), X, method=method, layer="dead")
    assert float(res.maps.abs().max()) == 0.0


def test_constant_map_warns_with_the_share() -> None:
    acts = torch.ones(2, 4, 4, 4)
    acts[1] = torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(0))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.AvgPool2d(1)  # the identity, telling channels first
            self.fc = nn.Linear(4, 3)
            with torch.no_grad():  # sample 0's map is 4 * 0.5 = 2 everywhere, exactly
                self.fc.weight.fill_(0.5)
                self.fc.bias.zero_()

        def forward(self, x: Tensor) -> Tensor:
            a = self.layer(acts[: x.shape[0]] + 0 * x.mean())
            out: Tensor = self.fc(a.mean((2, 3)))
            return out

    with pytest.warns(camkit.CamkitWarning, match=r"(?s)'layer'.*constant.*1 of 2"):
        res = camkit.explain(Head(), X, method="cam", layer="layer")
    assert float(res.maps[0].abs().max()) == 0.0 and float(res.maps[1].max()) == 1.0


def test_positions_with_the_same_features_warn_with_that_reason() -> None:
    # sample 0: every position holds the same channel vector (a token mixer that averages every
    # token); sample 1 the same up to float32 rounding (one ulp at one position), as a random-init
    # LeViT gives. Any channel weighting is then constant (here exactly: the head reads only
    # channel 0, and the ulp sits in channel 1), and the warning names the activations as the
    # reason, not the weights
    acts = torch.tensor([1.0, -2.0, 3.0, 0.5])[None, :, None, None].repeat(2, 1, 4, 4)
    acts[1, 1, 2, 1] = torch.nextafter(torch.tensor(-2.0), torch.tensor(-3.0))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()
            self.fc = nn.Linear(4, 3)
            with torch.no_grad():
                self.fc.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(3, 1))

        def forward(self, x: Tensor) -> Tensor:
            a = self.layer(acts[: x.shape[0]] + 0 * x.mean())
            out: Tensor = self.fc(a.mean((2, 3)))
            return out

    with pytest.warns(camkit.BlankMapWarning) as caught:
        # (2, 4, 4, 4) fits both layouts, and an identity does not tell: channels first, told
        res = camkit.explain(
            Head(), X, method="cam", layer="layer", target=[0, 0], reshape=lambda a: a
        )
    message = str(caught[0].message)
    assert "'layer': 2 of 2 maps are blank" in message
    assert "constant for 2 of 2 samples because the layer's activations are the same at " \
        "every position" in message  # fmt: skip
    assert "weights cancel" not in message
    assert float(res.maps.abs().max()) == 0.0


def test_ordinary_maps_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", camkit.CamkitWarning)
        for method in ["gradcam", "scorecam", "ablationcam", "eigencam"]:
            camkit.explain(TinyCNN(), X, method=method, layer="features")


# -- 5. guided backpropagation behaves as explain does ---------------------------------------
def test_guided_backprop_inside_no_grad_equals_outside() -> None:
    model = TinyCNN().eval()
    ref = camkit.guided_backprop(model, X)
    with torch.no_grad():
        got = camkit.guided_backprop(model, X)
    assert torch.is_grad_enabled()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert float(got.abs().max()) > 0


def test_guided_backprop_train_mode_batch_norm_keeps_the_statistics() -> None:
    model = BNNet().train()
    before = snapshot(model)
    got = camkit.guided_backprop(model, X)
    assert_unchanged(before, model)
    # a train-mode batch norm normalises with the batch's statistics: the same as a twin
    # that keeps no running statistics at all (and so has no buffers to restore)
    twin = copy.deepcopy(model)
    twin.bn.track_running_stats = False
    twin.bn.running_mean = twin.bn.running_var = twin.bn.num_batches_tracked = None
    ref = camkit.guided_backprop(twin, X)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert float(got.abs().max()) > 0


@pytest.mark.parametrize("compile_with", ["script", "trace"])
def test_guided_backprop_refuses_compiled_models(compile_with: str) -> None:
    eager = TinyCNN().eval()
    model = torch.jit.script(eager) if compile_with == "script" else torch.jit.trace(eager, X)
    with pytest.raises(camkit.ModelError, match=r"(?s)compiled.*eager"):
        camkit.guided_backprop(model, X)


def test_guided_backprop_non_finite_output_is_an_error() -> None:
    class NaNOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyCNN()

        def forward(self, x: Tensor) -> Tensor:
            out: Tensor = self.net(x) * math.nan
            return out

    with pytest.raises(camkit.TargetError, match="not finite"):
        camkit.guided_backprop(NaNOut(), X)


# -- 6. TorchScript and traced models --------------------------------------------------------
@pytest.mark.parametrize("compile_with", ["script", "trace"])
@pytest.mark.parametrize("layer", [None, "features"])
def test_compiled_models_are_a_model_error(compile_with: str, layer: str | None) -> None:
    eager = TinyCNN().eval()
    model = torch.jit.script(eager) if compile_with == "script" else torch.jit.trace(eager, X)
    with pytest.raises(camkit.ModelError, match=r"(?s)compiled.*eager"):
        camkit.explain(model, X, layer=layer)
    with pytest.raises(camkit.ModelError, match=r"(?s)compiled.*eager"):
        camkit.layers(model, X)


def test_a_compiled_part_after_the_layer_still_works() -> None:
    eager = TinyCNN().eval()
    model = nn.Sequential(eager.features, torch.jit.script(eager.head))
    ref = camkit.explain(eager, X, layer="features")
    got = camkit.explain(model, X, layer="0")
    torch.testing.assert_close(got.maps, ref.maps)
    assert any(info.name == "0" and info.candidate for info in camkit.layers(model, X))


# -- 7. raw internal errors become CamkitErrors ----------------------------------------------
class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x).T  # (classes, batch)
        return out


class _RankOne(camkit.Method):
    name = "rankone"
    needs_gradients = False

    def weights(self, ctx: camkit.Context) -> Tensor:
        return ctx.activations.new_ones(ctx.activations.shape[:2])

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        return ctx.activations.new_ones(ctx.activations.shape[0])


@pytest.mark.parametrize(
    ("call", "error", "says"),
    [
        (
            lambda: camkit.explain(TinyCNN(), torch.randn(2, 3, 16, 16, device="meta")),
            camkit.InputError,
            "meta",
        ),
        (lambda: camkit.explain(TinyCNN(), X, target=2**70), camkit.TargetError, "2"),
        (lambda: camkit.explain(TinyCNN(), X, seed=2**64), camkit.OptionError, "seed"),
        (lambda: camkit.explain(TinyCNN(), X, seed=-(2**63) - 1), camkit.OptionError, "seed"),
        (lambda: camkit.explain(Transposed(), X, layer="net.features"), camkit.TargetError, "5"),
        (
            lambda: camkit.explain(TinyCNN(), X, layer="features", reshape=lambda a: a.tolist()),
            camkit.OptionError,
            "reshape",
        ),
        (
            lambda: camkit.explain(TinyCNN(), X, method=_RankOne(), layer="features"),
            camkit.PluginError,
            "rankone",
        ),
        (lambda: camkit.explain(TinyCNN(), X[0]), camkit.InputError, "unsqueeze"),
        (lambda: camkit.list_methods(filter=3), camkit.OptionError, "filter"),
    ],
    ids=[
        "meta-input",
        "target-2**70",
        "seed-2**64",
        "seed-negative",
        "logits-classes-by-batch",
        "reshape-non-tensor",
        "combine-rank",
        "unbatched",
        "list-methods-filter",
    ],
)
def test_internal_errors_are_camkit_errors(call: Any, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=says):
        call()


# -- 9. memory driven by options -------------------------------------------------------------
@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "smoothgradcampp", "iscam"])
def test_huge_batch_size_is_clamped_to_the_work(method: str) -> None:
    """``batch_size=10**12`` would allocate terabytes if any buffer were sized by it."""
    opts: dict[str, Any] = {} if method in ("scorecam", "ablationcam") else {"n_samples": 3}
    model = TinyCNN().eval()
    ref = camkit.explain(model, X, method=method, layer="features", batch_size=64, **opts)
    got = camkit.explain(model, X, method=method, layer="features", batch_size=10**12, **opts)
    torch.testing.assert_close(got.maps, ref.maps, atol=1e-5, rtol=0)


# -- 10. camkit.layers keeps every buffer ----------------------------------------------------
def test_layers_keeps_batch_norm_statistics() -> None:
    model = BNNet().train()
    before = snapshot(model)
    infos = camkit.layers(model, X)
    assert [i.name for i in infos if i.candidate][-1] == "bn"
    assert_unchanged(before, model)
    assert int(model.bn.num_batches_tracked) == 0


# -- 11. exclusive use during a call; clean before and after ---------------------------------
def _failing_target(output: Tensor, index: Tensor | None = None) -> Tensor:
    raise RuntimeError("the target fails")


@pytest.mark.parametrize("method", ["gradcam", "ablationcam", "scorecam"])
def test_model_saves_and_copies_cleanly_after_a_call(method: str) -> None:
    """The documented contract: copy or save the model before or after a call, not during one
    (camkit's hooks are on its modules while the call runs); after it nothing of the call
    remains, whether it succeeded or failed."""
    model = TinyCNN().eval()
    expected = model(X)
    with pytest.raises(RuntimeError, match="the target fails"):
        camkit.explain(model, X, method=method, layer="features", target=_failing_target)
    camkit.explain(model, X, method=method, layer="features")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # no closure of the call left on any module
    twin = copy.deepcopy(model)
    for mod in twin.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
        assert "forward" not in vars(mod)
    torch.testing.assert_close(twin(X), expected, rtol=0, atol=0)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(X), expected, rtol=0, atol=0)


# -- 12. plugin names and refused checkpoints ------------------------------------------------
def test_load_plugins_names_are_stripped(monkeypatch: pytest.MonkeyPatch) -> None:
    from camkit.registry import Registry

    loaded: list[str] = []

    class EP:
        def __init__(self, dist: str) -> None:
            self.name = "plug"
            self.value = f"{dist}_plugin"
            self.dist = type("D", (), {"name": dist, "version": "1.0"})()

        def load(self) -> object:
            loaded.append(self.dist.name)
            return type(f"Plugin_{self.dist.name}", (), {})()

    monkeypatch.setattr(
        "importlib.metadata.entry_points",
        lambda group: [EP("first-dist"), EP("second-dist"), EP("third-dist")],
    )
    monkeypatch.setenv("CAMKIT_LOAD_PLUGINS", " first-dist , Second_Dist ,")
    Registry()
    assert loaded == ["first-dist", "second-dist"]


# -- 8. the command line ----------------------------------------------------------------------
CLI_MODELS = '''
import os
import time
from pathlib import Path

import torch
from torch import nn


class Raising(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.exc = exc

    def forward(self, x):
        raise self.exc


class Slow(nn.Module):
    """Signals that it runs (a file), then takes its time."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        Path(os.environ["CAMKIT_TEST_MARKER"]).touch()
        time.sleep(30)
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def value_error():
    return Raising(ValueError("bad value inside the model"))


def assertion_error():
    return Raising(AssertionError("an assert inside the model"))


def key_error():
    return Raising(KeyError("missing"))


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )


def slow():
    return Slow()
'''

CLI_PREP = ["--size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--no-progress"]


@pytest.fixture
def cli_models(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    import sys

    name = f"climodels_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(CLI_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _image(path: Any, seed: int = 0) -> Any:
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    assert cv2.imwrite(str(path), rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("factory", ["value_error", "assertion_error", "key_error"])
def test_cli_model_errors_of_any_type_are_one_line(
    factory: str, cli_models: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from camkit.cli import main

    out = tmp_path / "out"
    code = main(
        [
            "explain",
            str(_image(tmp_path / "a.png")),
            "--model",
            f"{cli_models}:{factory}",
            *CLI_PREP,
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("camkit: note:")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("camkit: error: the model failed")
    assert not out.exists() and not list(tmp_path.glob(".camkit-*"))


def test_cli_output_name_taken_by_a_folder_writes_nothing(
    cli_models: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from camkit.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "b_gradcam.png").mkdir()  # the second image's overlay name is a folder
    (out / "keep.txt").write_text("mine")
    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png", 1)
    code = main(["explain", str(a), str(b), "--model", f"{cli_models}:tiny", *CLI_PREP, "--out",
                 str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "b_gradcam.png" in err and "folder" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["b_gradcam.png", "keep.txt"]
    assert not list((out / "b_gradcam.png").iterdir())
    assert not list(out.glob(".camkit-*")) and not list(tmp_path.glob(".camkit-*"))


def test_cli_sigterm_leaves_no_temporary_folder(cli_models: str, tmp_path: Any) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "running"
    out = tmp_path / "out"
    env = {**os.environ, "CAMKIT_TEST_MARKER": str(marker), "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from camkit.cli import main; sys.exit(main())",
            "explain",
            str(_image(tmp_path / "a.png")),
            "--model",
            f"{cli_models}:slow",
            *CLI_PREP,
            "--out",
            str(out),
            "--layer",
            "conv",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the model never ran"
            time.sleep(0.05)
        assert list(tmp_path.glob(".camkit-*")), "the temporary folder should exist by now"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "camkit: terminated" in err
    assert not out.exists() and not list(tmp_path.glob(".camkit-*"))


# -- 12. a refused checkpoint says why, and how to load a trusted one ------------------------
def test_refused_checkpoint_says_why_and_how_to_load_a_trusted_file(tmp_path: Any) -> None:
    from camkit.cli import read_checkpoint

    path = tmp_path / "whole_model.pt"
    torch.save(TinyCNN(), path)  # the whole module: a pickle of classes, not plain weights
    with pytest.raises(camkit.CamkitError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "weights_only=False" not in message.replace("torch.load(path, weights_only=False)", "")
    assert "TinyCNN" in message or "camkit.toy" in message  # what it holds
    assert "trust" in message and "state_dict()" in message


def test_cli_predicted_class_does_not_depend_on_the_method(
    cli_models: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from camkit.cli import main

    a, b = _image(tmp_path / "a.png"), _image(tmp_path / "b.png", 1)
    predicted = {}
    for method in ["gradcam", "ablationcam", "scorecam"]:
        out = tmp_path / method
        argv = ["explain", str(a), str(b), "--model", f"{cli_models}:tiny", "--layer", "1"]
        argv += CLI_PREP
        code = main([*argv, "--method", method, "--json", "--out", str(out)])
        stdout, err = capsys.readouterr()
        assert code == 0, err
        predicted[method] = [img["predicted"] for img in json.loads(stdout)["images"]]
    assert predicted["ablationcam"] == predicted["gradcam"] == predicted["scorecam"]
