"""run_suffix: the prefix runs once, the replay is checked, and the fallback is exact."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any, ClassVar, NamedTuple

import pytest
import torch
from helpers import ResidualNet, assert_unchanged, hook_count, snapshot
from torch import nn

import camkit


class Ablate(camkit.Method):
    """Scores every single-channel ablation through run_suffix and through full re-runs."""

    name = "ablate-probe"
    citation = "test"
    cost = "test"
    needs_gradients = False
    seen: ClassVar[dict[str, Any]] = {}

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        a = ctx.activations
        n, c = a.shape[:2]
        k = min(c, 6)  # the first six channels keep the reference loop fast
        index = torch.arange(n).repeat_interleave(k)
        copies = a[index].clone()
        copies[torch.arange(n * k), torch.arange(k).repeat(n)] = 0  # zero channel j of copy j
        seen = type(self).seen
        kept = copies.clone()
        seen["suffix"] = ctx.run_suffix(copies, index)
        seen["copies kept"] = torch.equal(copies, kept)  # in-place ops after the layer
        # the reference: the whole model per copy, the layer's output replaced
        from camkit.capture import hooks_paused, output_replaced

        module = dict(ctx.model.named_modules())[ctx.layer]
        full = []
        with hooks_paused(), torch.no_grad():
            for j in range(n * k):
                with output_replaced(module, copies[j : j + 1]):
                    out = ctx.model(*(t[index[j] : index[j] + 1] for t in ctx.inputs))
                full.append(ctx.target.scores(out, index[j : j + 1]))
        seen["full"] = torch.cat(full)
        return a.new_ones(n, c)


def _run(model: nn.Module, x: torch.Tensor, layer: str, **options: Any) -> dict[str, Any]:
    Ablate.seen.clear()
    camkit.explain(model, x, method=Ablate(), layer=layer, target=[0] * x.shape[0], **options)
    return Ablate.seen


@pytest.mark.parametrize("layer", ["bn", "conv", "relu"])
@pytest.mark.parametrize("batch_size", [64, 5])
def test_replay_equals_full_reruns_with_inplace_and_residuals(layer: str, batch_size: int) -> None:
    # `out += shortcut` in place, ReLU(inplace), functional ops; 6 channels: at the bare ReLU
    # (3, 8, 8, 8) would fit both layouts
    model = ResidualNet(width=6).eval()
    before = snapshot(model)
    seen = _run(model, torch.randn(3, 3, 8, 8), layer, batch_size=batch_size)
    torch.testing.assert_close(seen["suffix"], seen["full"], rtol=1e-5, atol=1e-5)
    assert seen["copies kept"]
    assert_unchanged(before, model)
    assert hook_count(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_resnet_block_cut_inside_a_residual_block() -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    # layer4.0.conv1: the block's shortcut (downsample of the block input) crosses the cut
    for layer in ("layer4", "layer4.0.conv1"):
        seen = _run(model, x, layer)
        torch.testing.assert_close(seen["suffix"], seen["full"], rtol=1e-4, atol=1e-5)


class Keeper(nn.Module):
    """Stores a statistic of the whole batch as a side effect, used after the layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.saved = x.mean((1, 2, 3))
        return x


class SideEffect(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.keep = Keeper()
        self.layer = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.layer(self.keep(self.conv(x)))
        return self.fc(a.mean((2, 3))) + self.keep.saved[:, None]


def test_prefix_side_effect_falls_back_with_a_warning() -> None:
    torch.manual_seed(0)
    model = SideEffect().eval()
    with pytest.warns(camkit.CamkitWarning, match="Falling back to full re-runs"):
        seen = _run(model, torch.randn(3, 3, 6, 6), "layer")
    torch.testing.assert_close(seen["suffix"], seen["full"], rtol=1e-5, atol=1e-5)
    # a built-in method's fallback warning names the caller's line, not camkit's
    with pytest.warns(camkit.CamkitWarning, match="Falling back") as warned:
        camkit.explain(model, torch.randn(3, 3, 6, 6), method="ablationcam", layer="layer")
    assert warned[0].filename == __file__
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_train_mode_batchnorm_after_the_layer_falls_back() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 8, 8))  # materialise the lazy layer
    model.train()
    before = snapshot(model)
    with pytest.warns(camkit.CamkitWarning, match="Falling back"):
        seen = _run(model, torch.randn(3, 3, 8, 8), "1")
    assert seen["suffix"].shape == seen["full"].shape
    assert_unchanged(before, model)  # running statistics restored


def test_concurrent_replays_on_one_model() -> None:
    model = ResidualNet().eval()
    xs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    class Quiet(Ablate):
        def weights(self, ctx: camkit.Context) -> torch.Tensor:
            index = torch.arange(ctx.activations.shape[0]).repeat_interleave(8)
            copies = ctx.activations[index].clone()
            copies[torch.arange(len(index)), torch.arange(8).repeat(len(xs[0]))] = 0
            results[ctx.options["seed"]].append(ctx.run_suffix(copies, index))
            return ctx.activations.new_ones(ctx.activations.shape[:2])

    for i in range(2):
        camkit.explain(model, xs[i], method=Quiet(), layer="bn", target=[0, 0], seed=i)
    alone = [results[0].pop(), results[1].pop()]

    def work(i: int) -> None:
        barrier.wait()
        try:
            for _ in range(10):
                camkit.explain(model, xs[i], method=Quiet(), layer="bn", target=[0, 0], seed=i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        for r in results[i]:
            torch.testing.assert_close(r, alone[i], rtol=1e-5, atol=1e-6)
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_half_precision_model_replays_without_falling_back() -> None:
    model = ResidualNet().eval().to(torch.bfloat16)
    seen = _run(model, torch.randn(2, 3, 8, 8, dtype=torch.bfloat16), "bn")
    torch.testing.assert_close(seen["suffix"].float(), seen["full"].float(), rtol=2e-2, atol=2e-2)


def test_a_target_error_is_not_mistaken_for_an_invalid_replay() -> None:
    model = ResidualNet().eval()
    with pytest.raises(camkit.TargetError, match="must accept"):
        camkit.explain(
            model,
            torch.randn(2, 3, 8, 8),
            method="ablationcam",
            layer="bn",
            target=lambda out: out[:, 0],
        )


class RewritesThePrefix(nn.Module):
    """After the layer, the forward applies ReLU in place to a value from before it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.layer = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.conv(x)
        h = self.layer(p)
        p.relu_()  # writes into the recorded value; idempotent, so the replay stays valid
        return self.fc((h + p).mean((2, 3)))


def test_a_replay_writing_into_recorded_values_records_again_and_stays_fast() -> None:
    torch.manual_seed(0)
    model = RewritesThePrefix().eval()
    seen = _run(model, torch.randn(1, 3, 6, 6), "layer")  # a fallback would warn (an error)
    torch.testing.assert_close(seen["suffix"], seen["full"], rtol=1e-5, atol=1e-6)
    assert seen["copies kept"]


class SequenceFirst(nn.Module):
    """Patch tokens with a class token through two encoder layers, ``(T, N, C)`` or
    ``(N, T, C)``; the second layer mixes the tokens, and the class token is scored."""

    def __init__(self, seq_first: bool) -> None:
        super().__init__()
        self.seq_first = seq_first
        self.embed = nn.Conv2d(3, 8, 4, stride=4)  # 16x16 -> 4x4 patches
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        kw: dict[str, Any] = {"dropout": 0.0, "batch_first": not seq_first}
        self.block = nn.TransformerEncoderLayer(8, 2, 16, **kw)
        self.mix = nn.TransformerEncoderLayer(8, 2, 16, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)  # (N, 17, 8)
        if self.seq_first:
            t = t.transpose(0, 1)
        h = self.mix(self.block(t))
        return self.head(h[0] if self.seq_first else h[:, 0])


def _twins() -> tuple[SequenceFirst, SequenceFirst]:
    """The same weights laid out batch first and sequence first."""
    torch.manual_seed(0)
    batch_first = SequenceFirst(seq_first=False).eval()
    seq_first = SequenceFirst(seq_first=True).eval()
    seq_first.load_state_dict(batch_first.state_dict())
    return batch_first, seq_first


def test_sequence_first_tokens_replay_per_sample() -> None:
    # the same weights laid out (T, N, C) and (N, T, C) give the same Ablation-CAM weights,
    # each sample its own (a replay gathering the wrong dimension would mix them up)
    batch_first, seq_first = _twins()
    x = torch.randn(3, 3, 16, 16)
    results = [
        camkit.explain(m, x, method="ablationcam", layer="block", target=[0, 1, 2], batch_size=5)
        for m in (batch_first, seq_first)
    ]
    torch.testing.assert_close(results[1].weights, results[0].weights, rtol=1e-4, atol=1e-6)
    assert results[0].weights.abs().amax(dim=1).min() > 0  # every sample has non-zero weights
    assert not torch.allclose(results[0].weights[0], results[0].weights[1])


def test_sequence_first_tokens_with_several_targets_per_sample() -> None:
    batch_first, seq_first = _twins()
    x = torch.randn(2, 3, 16, 16)
    for method in ("gradcam", "ablationcam"):
        results = [
            camkit.explain(m, x, method=method, layer="block", target=camkit.targets.TopK(2))
            for m in (batch_first, seq_first)
        ]
        assert results[0].maps.shape == (2, 2, 16, 16)
        torch.testing.assert_close(results[1].maps, results[0].maps, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[1].weights, results[0].weights, rtol=1e-4, atol=1e-6)


class Stem(nn.Module):
    """A prefix module that counts the times it really computes (a replay answers it from the
    record without running this forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.runs = 0
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        self.rows += int(x.shape[0])
        return torch.relu(self.conv(x))


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = Stem()
        self.layer = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.layer(self.stem(x))).mean((2, 3)))


class TwoForwards(camkit.Method):
    """Ablation-CAM without ``uses_run_suffix``: an explained forward, then run_suffix's own
    record and check."""

    name = "ablation-two-forwards"
    citation = "test"
    cost = "test"
    needs_gradients = False
    options: ClassVar[dict[str, Any]] = {"denominator": "abs"}

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        from camkit_plugins.ablationcam import AblationCAM

        return AblationCAM().weights(ctx)


@pytest.mark.parametrize("model_cls", [Counting, RewritesThePrefix])
def test_ablationcam_records_in_the_explained_forward(model_cls: type[nn.Module]) -> None:
    # a method that declares uses_run_suffix gets the record from the explained forward: the
    # prefix computes on the batch once (the replay's check passed on the first call and is
    # remembered), where otherwise it computes on the batch twice, for the same maps
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(3, 3, 6, 6)
    before = snapshot(model)
    one = camkit.explain(model, x, method="ablationcam", layer="layer", target=[0, 1, 0])
    two = camkit.explain(model, x, method=TwoForwards(), layer="layer", target=[0, 1, 0])
    torch.testing.assert_close(one.weights, two.weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(one.scores, two.scores)
    assert one.weights.abs().amax(dim=1).min() > 0
    if isinstance(model, Counting):
        model.stem.runs = model.stem.rows = 0
        camkit.explain(model, x, method="ablationcam", layer="layer", target=[0, 1, 0])
        assert (model.stem.runs, model.stem.rows) == (1, 3)  # the batch
        model.stem.runs = model.stem.rows = 0
        camkit.explain(model, x, method=TwoForwards(), layer="layer", target=[0, 1, 0])
        assert (model.stem.runs, model.stem.rows) == (2, 3 + 3)  # the batch, twice
    assert_unchanged(before, model)
    assert hook_count(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())


class CountingHead(Counting):
    """:class:`Counting` that also counts the calls of the part after the layer (``fc``)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_calls = 0
        self.fc.register_forward_hook(
            lambda m, a, o: setattr(self, "head_calls", 1 + self.head_calls)
        )

    def counts(self) -> tuple[int, int, int]:
        got = (self.stem.runs, self.stem.rows, self.head_calls)
        self.stem.runs = self.stem.rows = self.head_calls = 0
        return got


def _ablate(model: nn.Module, x: torch.Tensor) -> camkit.CamResult:
    return camkit.explain(model, x, method="ablationcam", layer="layer", batch_size=7)


def test_ablationcam_checks_the_replay_once_per_model_and_input_signature() -> None:
    # full forwards (the prefix computing) and calls of the head: the first call per model and
    # input signature runs the checked copy's forward of one row (1 more full forward, 1 more
    # row) and its replay (the head twice more); later calls only the explained forward, the
    # replay of the batch and the ablated copies (6 channels, batch_size 7: 1 replay a sample)
    torch.manual_seed(0)
    model = CountingHead().eval()
    x = torch.randn(3, 3, 6, 6)
    first = _ablate(model, x)
    assert model.counts() == (2, 3 + 1, 1 + 1 + 1 + 1 + 3)
    for _ in range(3):
        res = _ablate(model, x)
        assert model.counts() == (1, 3, 1 + 1 + 3)
        assert torch.equal(res.weights, first.weights)
        assert torch.equal(res.scores, first.scores)
    # another input signature (spatial size, batch size, dtype) is checked once again
    _ablate(model, torch.randn(3, 3, 8, 8))
    assert model.counts() == (2, 4, 7)
    _ablate(model, torch.randn(2, 3, 6, 6))
    assert model.counts() == (2, 3, 6)
    _ablate(model, x)
    assert model.counts() == (1, 3, 5)  # the earlier signatures are still remembered


def test_the_remembered_check_is_forgotten_when_the_model_changes() -> None:
    torch.manual_seed(0)
    model = CountingHead().eval()
    x = torch.randn(3, 3, 6, 6)
    _ablate(model, x)
    _ablate(model, x)
    assert model.counts()[:2] == (3, 7)  # checked once
    model.load_state_dict(CountingHead().state_dict())  # new weights: checked again
    _ablate(model, x)
    _ablate(model, x)
    assert model.counts()[:2] == (3, 7)
    with torch.no_grad():
        model.fc.weight.mul_(2)  # an in-place update (an optimiser's step)
    _ablate(model, x)
    assert model.counts()[:2] == (2, 4)
    model.layer = nn.Conv2d(4, 6, 3, padding=1).eval()  # a module replaced
    _ablate(model, x)
    assert model.counts()[:2] == (2, 4)
    model.stem.conv.forward = model.stem.conv.forward  # type: ignore[method-assign]
    _ablate(model, x)  # an instance forward set on a module
    assert model.counts()[:2] == (2, 4)
    del model.stem.conv.forward
    _ablate(model, x)
    assert model.counts()[:2] == (2, 4)
    model.train()
    _ablate(model, x)
    _ablate(model, x)  # in training mode every call checks
    assert model.counts()[:2] == (4, 8)
    model.eval()
    _ablate(model, x)
    assert model.counts()[:2] == (1, 3)  # back in eval mode: remembered for this state


def test_a_failed_replay_check_is_not_remembered() -> None:
    # a model whose replay is not exact falls back on every call, with its warning each time
    torch.manual_seed(0)
    model = SideEffect().eval()
    x = torch.randn(3, 3, 6, 6)
    for _ in range(2):
        with pytest.warns(camkit.CamkitWarning, match="Falling back"):
            camkit.explain(model, x, method="ablationcam", layer="layer")


def test_the_remembered_check_does_not_keep_the_model_alive() -> None:
    model = CountingHead().eval()
    _ablate(model, torch.randn(3, 3, 6, 6))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_ablationcam_with_several_targets_matches_one_target_at_a_time() -> None:
    torch.manual_seed(0)
    model = Counting().eval()
    x = torch.randn(2, 3, 6, 6)
    both = camkit.explain(model, x, method="ablationcam", layer="layer", target=[[0, 2], [1, 0]])
    assert both.weights.shape == (2, 2, 6)
    for k, targets in enumerate(([0, 1], [2, 0])):
        one = camkit.explain(model, x, method="ablationcam", layer="layer", target=targets)
        torch.testing.assert_close(both.weights[:, k], one.weights, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(both.maps[:, k], one.maps, rtol=1e-5, atol=1e-6)


class Fields(dict[str, torch.Tensor]):
    """A dict whose items are also attributes, as transformers' ``ModelOutput``."""

    def __getattr__(self, key: str) -> torch.Tensor:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


class Pair(NamedTuple):
    features: torch.Tensor
    skip: torch.Tensor


class Encoder(nn.Module):
    """Returns its features in a structure read by attribute."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        f = self.conv(x)
        if self.kind == "fields":
            return Fields(features=f, skip=f.mean((2, 3)))
        return Pair(f, f.mean((2, 3)))


class StructuredPrefix(nn.Module):
    """The layer reads ``encoder(x).features``; the head reads the layer and ``.skip``, a value
    from before the layer (the replay answers the encoder's call from its record)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.encoder = Encoder(kind)
        self.layer = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 + 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encoder(x)
        h = torch.relu(self.layer(enc.features)).mean((2, 3))
        return self.fc(torch.cat([h, enc.skip], dim=1))


@pytest.mark.parametrize("kind", ["fields", "namedtuple"])
def test_a_prefix_returning_a_structure_read_by_attribute_replays(kind: str) -> None:
    # the encoder's recorded output is a dict read by attribute (transformers' ModelOutput) or
    # a named tuple: the replay hands back the rows of each field in the same type, so the
    # suffix runs alone (a fallback warns, an error here) and scores as full re-runs do
    torch.manual_seed(0)
    model = StructuredPrefix(kind).eval().double()
    seen = _run(model, torch.randn(3, 3, 6, 6, dtype=torch.float64), "layer")
    torch.testing.assert_close(seen["suffix"], seen["full"], rtol=1e-12, atol=1e-12)
    assert seen["suffix"].abs().min() > 0
