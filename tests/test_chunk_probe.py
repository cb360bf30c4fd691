"""``batch_size="auto"`` on the CPU: the probe's spans, what it remembers, and the methods on it.

A fake clock (``camkit.batching.clock``) advances by a chosen cost per row of each chunk size, so
that the probe's choice is known in advance; nothing sleeps and nothing is timed for real.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import camkit
from camkit import batching
from camkit.batching import chosen_rows, chunk_spans

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
given, settings = hypothesis.given, hypothesis.settings

IMAGE = torch.empty(1, 3, 224, 224)  # the rule: 8 rows, so the probe tries 4, 8, 16
PROBE = [4, 8, 16, 16, 8, 4]  # 56 rows: runs on 112 rows or more


class Clock:
    """Fake seconds: ``spend(rows)`` advances by ``rows`` times the cost per row of that size."""

    def __init__(self, per_row: dict[int, float], first: dict[int, float] | None = None) -> None:
        self.now = 0.0
        self.per_row, self.first = per_row, dict(first or {})

    def __call__(self) -> float:
        return self.now

    def spend(self, rows: int) -> None:
        cost = self.first.pop(rows, None)  # a size's first run only
        self.now += rows * (cost if cost is not None else self.per_row.get(rows, 1.0))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock({4: 1.0, 8: 1.1, 16: 1.3})  # 4 rows fastest per row
    monkeypatch.setattr(batching, "clock", fake)
    return fake


def run(spans: Iterator[tuple[int, int]], clock: Clock) -> list[int]:
    """Consume ``spans`` as a method does (the work of each span between two requests)."""
    sizes = []
    for start, stop in spans:
        sizes.append(stop - start)
        clock.spend(stop - start)
    return sizes


def test_the_first_spans_are_the_probe_then_the_fastest_size(clock: Clock) -> None:
    model = nn.Linear(1, 1)
    assert chosen_rows(model, IMAGE) is None
    assert run(chunk_spans("auto", 300, IMAGE, model), clock) == PROBE + [4] * 61
    assert chosen_rows(model, IMAGE) == 4
    # remembered: the next call on the same model and rows has no probe
    assert run(chunk_spans("auto", 300, IMAGE, model), clock) == [4] * 75
    assert run(chunk_spans("auto", 10, IMAGE, model), clock) == [4, 4, 2]


def test_a_size_scores_its_faster_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4's first run pays setup (10 s per row); its second run is the fastest of all
    fake = Clock({4: 1.0, 8: 1.1, 16: 1.3}, first={4: 10.0})
    monkeypatch.setattr(batching, "clock", fake)
    model = nn.Linear(1, 1)
    assert run(chunk_spans("auto", 112, IMAGE, model), fake) == PROBE + [4] * 14
    assert chosen_rows(model, IMAGE) == 4
    # 16 fastest: the rest runs in chunks of 16, the last one shorter
    fake = Clock({4: 1.0, 8: 0.9, 16: 0.8})
    monkeypatch.setattr(batching, "clock", fake)
    assert run(chunk_spans("auto", 120, IMAGE, nn.Linear(1, 1)), fake) == PROBE + [16] * 4
    # a tie keeps the rule
    fake = Clock({4: 1.0, 8: 1.0, 16: 1.0})
    monkeypatch.setattr(batching, "clock", fake)
    assert run(chunk_spans("auto", 120, IMAGE, nn.Linear(1, 1)), fake) == PROBE + [8] * 8


def test_another_model_shape_or_work_probes_again(clock: Clock) -> None:
    model, other = nn.Linear(1, 1), nn.Linear(1, 1)
    run(chunk_spans("auto", 112, IMAGE, model), clock)
    assert run(chunk_spans("auto", 112, IMAGE, other), clock) == PROBE + [4] * 14
    # 112x112 images: the rule gives 32, the probe tries 16, 32, 64 (224 rows) on 448 rows
    small = torch.empty(1, 3, 112, 112)
    assert run(chunk_spans("auto", 448, small, model), clock)[:6] == [16, 32, 64, 64, 32, 16]
    # 16 costs 1.3 per row, 32 and 64 (unlisted) 1.0: a tie, which keeps the rule
    assert chosen_rows(model, small) == 32
    assert run(chunk_spans("auto", 112, IMAGE, model, work="replay"), clock)[:6] == PROBE
    assert run(chunk_spans("auto", 112, IMAGE.double(), model), clock)[:3] == [2, 4, 8]
    assert chosen_rows(model, IMAGE) == 4  # the first choice stays


def test_another_thread_count_probes_again(clock: Clock) -> None:
    model = nn.Linear(1, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(chunk_spans("auto", 112, IMAGE, model), clock)
        assert chosen_rows(model, IMAGE) == 4
        torch.set_num_threads(2)
        assert chosen_rows(model, IMAGE) is None
        assert run(chunk_spans("auto", 112, IMAGE, model), clock) == PROBE + [4] * 14
    finally:
        torch.set_num_threads(threads)


def test_too_few_rows_run_in_chunks_of_the_rule_and_remember_nothing(clock: Clock) -> None:
    model = nn.Linear(1, 1)
    assert run(chunk_spans("auto", 111, IMAGE, model), clock) == [8] * 13 + [7]
    assert chosen_rows(model, IMAGE) is None
    assert run(chunk_spans("auto", 112, IMAGE, model), clock)[:6] == PROBE


def test_small_rows_try_twice_the_rules_cap(clock: Clock) -> None:
    # 32x32 images: the rule gives its cap, 64 rows; the probe also tries 128
    row = torch.empty(1, 3, 32, 32)
    assert batching.auto_batch_size(row) == batching.CPU_MAX_ROWS
    model = nn.Linear(1, 1)
    clock.per_row = {32: 1.0, 64: 0.9, 128: 0.8}
    assert run(chunk_spans("auto", 1000, row, model), clock)[:7] == [32, 64, 128, 128, 64, 32, 128]
    assert chosen_rows(model, row) == batching.PROBE_MAX_ROWS == 128


def test_an_int_or_another_device_uses_fixed_spans_and_no_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_clock() -> float:
        raise AssertionError("the clock was read")

    monkeypatch.setattr(batching, "clock", no_clock)
    model = nn.Linear(1, 1)
    assert list(chunk_spans(5, 12, IMAGE, model)) == [(0, 5), (5, 10), (10, 12)]
    assert list(chunk_spans(1000, 3, IMAGE, model)) == [(0, 3)]
    assert list(chunk_spans(5, 0, IMAGE, model)) == []
    assert list(chunk_spans(5, 12, IMAGE, model, reserve=1)) == [(0, 4), (4, 8), (8, 12)]
    assert list(chunk_spans(1, 2, IMAGE, model, reserve=1)) == [(0, 1), (1, 2)]
    # not a CPU (nor CUDA): the rule, no probe, nothing remembered
    meta = torch.empty(1, 3, 224, 224, device="meta")
    assert [b - a for a, b in chunk_spans("auto", 300, meta, model)] == [8] * 37 + [4]
    assert chosen_rows(model, meta) is None


def test_reserve_probes_copies_per_span(clock: Clock) -> None:
    # Ablation-CAM's spans: each re-run adds the unablated row, so 8 rows hold 7 copies
    model = nn.Linear(1, 1)
    clock.per_row = {3: 1.0, 7: 0.5, 15: 0.7}
    sizes = run(chunk_spans("auto", 100, IMAGE, model, reserve=1), clock)
    assert sizes == [3, 7, 15, 15, 7, 3] + [7] * 7 + [1]
    assert chosen_rows(model, IMAGE, reserve=1) == 8  # rows, the unablated one included
    assert chosen_rows(model, IMAGE) is None


def test_a_chunking_inside_a_chunk_of_the_same_model_keeps_its_rows(clock: Clock) -> None:
    model, other = nn.Linear(1, 1), nn.Linear(1, 1)
    inner: list[list[int]] = []
    for start, stop in chunk_spans("auto", 112, IMAGE, model):
        # ctx.score on the chunk: one run, not the rule's 8 rows nor a probe of its own
        inner.append([b - a for a, b in chunk_spans("auto", stop - start, IMAGE, model)])
        clock.spend(stop - start)
    assert inner == [[4], [8], [16], [16], [8], [4]] + [[4]] * 14
    # more rows than the enclosing chunk (4 rows): its rows, whatever the rows (112x112 alone:
    # one chunk of 10); another model: its own rule
    small = torch.empty(1, 3, 112, 112)
    assert [b - a for a, b in chunk_spans("auto", 10, small, model)] == [10]
    for _start, _stop in chunk_spans("auto", 10, IMAGE, model):
        assert [b - a for a, b in chunk_spans("auto", 10, small, model)] == [4, 4, 2]
        assert [b - a for a, b in chunk_spans("auto", 10, IMAGE, other)] == [8, 2]
        break
    # an int chunk does not bind the ones inside it
    for _start, _stop in chunk_spans(16, 16, IMAGE, model):
        assert [b - a for a, b in chunk_spans("auto", 10, small, model)] == [10]
    assert not batching._open_chunks()  # the break closed the span


def test_a_garbage_collected_models_choice_goes_with_it(clock: Clock) -> None:
    model = nn.Linear(1, 1)
    run(chunk_spans("auto", 112, IMAGE, model), clock)
    assert chosen_rows(model, IMAGE) == 4
    gc.collect()
    count = len(batching._CHOSEN)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # nothing keeps the model alive
    assert len(batching._CHOSEN) == count - 1


def test_an_exception_mid_probe_remembers_nothing(clock: Clock) -> None:
    model = nn.Linear(1, 1)

    def fail_on_the_third() -> None:
        for n, (start, stop) in enumerate(chunk_spans("auto", 300, IMAGE, model)):
            if n == 2:
                raise RuntimeError("forward failed")
            clock.spend(stop - start)

    with pytest.raises(RuntimeError, match="forward failed") as info:
        fail_on_the_third()
    assert info.value is not None  # the traceback is still alive here
    assert chosen_rows(model, IMAGE) is None
    assert not batching._open_chunks()
    assert model not in batching._CHOSEN
    assert run(chunk_spans("auto", 300, IMAGE, model), clock)[:6] == PROBE
    assert chosen_rows(model, IMAGE) == 4


def test_an_abandoned_iterator_remembers_nothing(clock: Clock) -> None:
    model = nn.Linear(1, 1)
    spans = chunk_spans("auto", 300, IMAGE, model)
    for _ in range(5):
        next(spans)
    assert len(batching._open_chunks()) == 1  # a chunk is out
    spans.close()
    assert not batching._open_chunks()
    assert chosen_rows(model, IMAGE) is None


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.one_of(st.integers(1, 70), st.just("auto")),
    total=st.integers(0, 1000),
    reserve=st.integers(0, 2),
    side=st.sampled_from([8, 112, 224, 400]),
    costs=st.lists(st.floats(0.1, 10.0), min_size=8, max_size=8),
)
def test_spans_cover_the_range_once_in_order(
    batch_size: int | str, total: int, reserve: int, side: int, costs: list[float]
) -> None:
    fake = Clock({2**k: c for k, c in enumerate(costs)})
    real = batching.clock
    batching.clock = fake
    try:
        model = nn.Linear(1, 1)
        row = torch.empty(1, 3, side, side)
        for _call in range(2):  # probing, then remembered
            spans = []
            for start, stop in chunk_spans(batch_size, total, row, model, reserve=reserve):
                spans.append((start, stop))
                fake.spend(stop - start)
            reached = 0
            for start, stop in spans:  # each span starts where the last stopped, non-empty
                assert start == reached < stop
                reached = stop
            assert reached == total
            assert all(b - a <= batching.PROBE_MAX_ROWS for a, b in spans)
            if isinstance(batch_size, int):
                assert all(b - a <= max(1, batch_size - reserve) for a, b in spans)
    finally:
        batching.clock = real


# -- the methods on the probe ------------------------------------------------------------------
class Net(nn.Module):
    """64 channels at ``features`` (no ReLU: no constant map, every channel is scored)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Conv2d(3, 64, 3, padding=1)
        self.head = nn.Sequential(
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5)
        )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.features(x))
        return out


def counted(module: nn.Module, fake: Clock) -> list[int]:
    """Rows of each call of ``module``; each call spends its rows on the fake clock."""
    rows: list[int] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        rows.append(int(args[0].shape[0]))
        fake.spend(rows[-1])

    module.register_forward_hook(hook)
    return rows


@pytest.fixture
def small_rule(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """Make the rule give ``rows`` rows for rows of ``nbytes`` (tiny test inputs)."""

    def set_rule(rows: int, nbytes: int) -> None:
        monkeypatch.setattr(batching, "CPU_CHUNK_BYTES", rows * nbytes)

    return set_rule


def test_scorecam_on_auto_scores_the_rows_of_an_int_batch_size(
    monkeypatch: pytest.MonkeyPatch, small_rule: Callable[[int, int], None]
) -> None:
    fake = Clock({2: 1.0, 4: 0.5, 8: 0.75})
    monkeypatch.setattr(batching, "clock", fake)
    x = torch.randn(1, 3, 8, 8)
    small_rule(4, 3 * 8 * 8 * 4)  # the rule: 4 rows; the probe tries 2, 4, 8 on 28 of 64
    model = Net().eval()
    rows = counted(model, fake)
    kwargs: dict[str, Any] = {"layer": "features", "target": 1}
    auto = camkit.explain(model, x, method="scorecam", **kwargs)
    # the explained forward, the probe, then the fastest (4) for the other 36 channels; each
    # probe chunk reaches the model whole (ctx.score keeps Score-CAM's chunk)
    assert rows == [1, 2, 4, 8, 8, 4, 2] + [4] * 9
    rows.clear()
    again = camkit.explain(model, x, method="scorecam", **kwargs)
    assert rows == [1] + [4] * 16
    rows.clear()
    eight = camkit.explain(model, x, method="scorecam", batch_size=8, **kwargs)
    assert rows == [1] + [8] * 8
    torch.testing.assert_close(auto.maps, eight.maps, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.maps, eight.maps, rtol=0, atol=1e-5)


def test_sscam_probes_once_and_scores_the_rows_of_an_int_batch_size(
    monkeypatch: pytest.MonkeyPatch, small_rule: Callable[[int, int], None]
) -> None:
    fake = Clock({2: 0.5, 4: 1.0, 8: 0.75})
    monkeypatch.setattr(batching, "clock", fake)
    x = torch.randn(2, 3, 8, 8)
    small_rule(4, 3 * 8 * 8 * 4)
    model = Net().eval()
    rows = counted(model, fake)
    kwargs: dict[str, Any] = {"layer": "features", "target": [0, 3], "n_samples": 2, "seed": 3}
    auto = camkit.explain(model, x, method="sscam", **kwargs)
    # the first draw of the first sample probes and chooses 2; the other three run in 2s
    assert rows == [2] + [2, 4, 8, 8, 4, 2] + [2] * 18 + [2] * 32 * 3
    scored = sum(rows[1:])
    rows.clear()
    eight = camkit.explain(model, x, method="sscam", batch_size=8, **kwargs)
    assert rows == [2] + [8] * 8 * 4
    assert scored == sum(rows[1:]) == 2 * 2 * 64
    torch.testing.assert_close(auto.maps, eight.maps, rtol=0, atol=1e-5)


def test_ablationcam_probes_its_replays(
    monkeypatch: pytest.MonkeyPatch, small_rule: Callable[[int, int], None]
) -> None:
    fake = Clock({2: 1.0, 4: 1.0, 8: 0.5})  # rows of a replay: 8 fastest per row
    monkeypatch.setattr(batching, "clock", fake)
    x = torch.randn(1, 3, 8, 8)
    small_rule(4, 64 * 8 * 8 * 4)  # one copy of the layer's output: 4 rows
    model = Net().eval()
    rows = counted(model.head[3], fake)  # the replays run the head only
    kwargs: dict[str, Any] = {"layer": "features", "target": 2}
    auto = camkit.explain(model, x, method="ablationcam", **kwargs)
    replays = rows[-12:]
    # the probe: 1, 3, 7 copies each with the unablated row, then 7 copies a replay
    assert replays == [2, 4, 8, 8, 4, 2] + [8] * 6
    assert sum(r - 1 for r in replays) == 64  # every channel ablated once
    copy = torch.empty(1, 64, 8, 8)
    assert chosen_rows(model, copy, work=("suffix", "features"), reserve=1) == 8
    eight = camkit.explain(model, x, method="ablationcam", batch_size=8, **kwargs)
    torch.testing.assert_close(auto.maps, eight.maps, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("smoothgradcampp", {"n_samples": 64}),  # ctx.recapture, forward and backward
        ("rise", {"n_masks": 64, "cells": 2}),
        ("occlusion", {"patch": 1, "stride": 1}),  # 64 patch positions on 8x8
    ],
)
def test_other_rerunning_methods_probe_and_keep_their_maps(
    monkeypatch: pytest.MonkeyPatch,
    small_rule: Callable[[int, int], None],
    method: str,
    options: dict[str, Any],
) -> None:
    fake = Clock({2: 1.0, 4: 1.5, 8: 0.75})  # 8 fastest
    monkeypatch.setattr(batching, "clock", fake)
    x = torch.randn(1, 3, 8, 8)
    small_rule(4, 3 * 8 * 8 * 4)
    model = Net().eval()
    rows = counted(model, fake)
    kwargs: dict[str, Any] = {"layer": "features", "target": 1, "seed": 0, **options}
    auto = camkit.explain(model, x, method=method, **kwargs)
    assert rows[-11:] == [2, 4, 8, 8, 4, 2] + [8] * 4 + [4]  # 28 probed, 36 after
    rows.clear()
    eight = camkit.explain(model, x, method=method, batch_size=8, **kwargs)
    assert rows[-8:] == [8] * 8
    torch.testing.assert_close(auto.maps, eight.maps, rtol=0, atol=1e-5)
