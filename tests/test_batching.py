"""``batch_size="auto"``: the CPU and CUDA rules, and maps that do not depend on the chunk."""

from __future__ import annotations

import os

import pytest
import torch

import camkit
from camkit.batching import CPU_MAX_ROWS, CUDA_MAX_ROWS, auto_batch_size, resolve_batch_size
from camkit.options import COMMON_OPTIONS
from camkit.toy import TinyCNN


@pytest.mark.parametrize(
    ("shape", "rows"),
    [
        ((1, 3, 224, 224), 8),  # eight images fill the budget exactly
        ((1, 3, 225, 224), 4),  # one byte more per row: the next power of two down
        ((1, 3, 112, 112), 32),
        ((1, 3, 32, 32), CPU_MAX_ROWS),  # small rows: capped
        ((1, 3, 1024, 1024), 1),  # one row over the budget still runs, alone
        ((1, 512, 7, 7), 32),  # a ResNet-18 layer4 copy: 100 KB
    ],
)
def test_cpu_rule_holds_eight_224_images_of_bytes(shape: tuple[int, ...], rows: int) -> None:
    assert auto_batch_size(torch.empty(shape)) == rows


def test_rows_of_several_inputs_and_dtypes_count_together() -> None:
    image = torch.empty(1, 3, 224, 224, dtype=torch.float16)  # half the bytes: 16 rows
    assert auto_batch_size(image) == 16
    assert auto_batch_size((image, torch.empty(1, 3, 224, 224, dtype=torch.float16))) == 8


def test_cpu_rule_does_not_read_the_machine_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # the chunk orders the float operations of each forward: a load-dependent chunk would make
    # the last bits of a map (and a two-process comparison table) depend on other processes
    row = torch.empty(1, 3, 224, 224)
    cpus = os.cpu_count() or 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for load in (0.0, float(cpus), 10.0 * cpus):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            assert auto_batch_size(row) == 8
    finally:
        torch.set_num_threads(threads)


def test_cuda_rule_fits_a_share_of_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    row = torch.empty(1, 3, 224, 224)  # 602112 bytes, counted 64 times: 38.5 MB per row
    # a quarter of 8 GiB holds 55 such rows: 32
    assert auto_batch_size(row, torch.device("cuda")) == 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**15, 10**15))
    assert auto_batch_size(row, torch.device("cuda")) == CUDA_MAX_ROWS


def test_an_int_is_used_as_given() -> None:
    assert resolve_batch_size(5, torch.empty(1, 3, 224, 224)) == 5
    assert resolve_batch_size("auto", torch.empty(1, 3, 224, 224)) == 8


def test_auto_is_the_default_and_other_strings_are_refused() -> None:
    assert COMMON_OPTIONS["batch_size"] == "auto"
    with pytest.raises(camkit.OptionError, match="'auto' or a positive int"):
        camkit.explain(TinyCNN(), torch.randn(1, 3, 8, 8), method="scorecam", batch_size="max")


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "smoothgradcampp"])
def test_auto_gives_the_maps_of_an_int_batch_size(method: str) -> None:
    torch.manual_seed(0)
    model = TinyCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    kwargs = {"layer": "features", "target": [0, 2], "relu": False, "normalize": False}
    auto = camkit.explain(model, x, method=method, **kwargs)
    one = camkit.explain(model, x, method=method, batch_size=1, **kwargs)
    assert auto_batch_size(x[:1]) == CPU_MAX_ROWS  # every copy in one chunk
    torch.testing.assert_close(auto.raw, one.raw, rtol=1e-9, atol=1e-12)
