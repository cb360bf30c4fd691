"""pytest setup of the benchmark suite: options, markers, CPU threads, the figures summary.

Run from the repository root (the project's ``testpaths`` names only ``tests``, so the
directory must be given)::

    .venv/bin/python -m pytest benchmarks/ -p no:randomly

Options: ``--bench-rounds`` (interleaved timing rounds), ``--bench-warmup`` (untimed calls of
each operation first), ``--bench-quiet`` (seconds to wait, at most, for other processes to
leave the CPUs before each timed call), ``--bench-repeats`` (fresh processes per memory
case). ``-m quick`` runs only the small resnet18 cases, a check of the harness that gates
nothing. The figures are printed at the end of the run and stored in each benchmark's
``extra_info`` (see ``--benchmark-json``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks._lib import THREADS, Comparison, Settings, Spread, environment, machine

_FIGURES = pytest.StashKey[list[tuple[str, str]]]()
_RATIOS = pytest.StashKey[dict[str, Any]]()
_LOAD = pytest.StashKey[list[float]]()
RATIOS_JSON = ".benchmarks/ratios.json"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("camkit-benchmarks", "camkit benchmarks")
    group.addoption(
        "--bench-rounds",
        type=int,
        default=21,
        help="interleaved rounds per timing comparison (default 21)",
    )
    group.addoption(
        "--bench-warmup",
        type=int,
        default=2,
        help="untimed calls of each operation before timing (default 2)",
    )
    group.addoption(
        "--bench-quiet",
        type=float,
        default=30.0,
        help="before each timed call, wait up to this many seconds for other processes to "
        "leave the CPUs (default 30; 0: do not wait)",
    )
    group.addoption(
        "--bench-json",
        default=RATIOS_JSON,
        help=f"write the gated ratios here, for python -m benchmarks.compare (default "
        f"{RATIOS_JSON}; '' writes nothing)",
    )
    group.addoption(
        "--bench-repeats",
        type=int,
        default=3,
        help="fresh processes per operation in the memory benchmark (default 3)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Random-init models give some samples a blank map, which camkit reports with a
    ``BlankMapWarning`` (an error under the test suite's warning filter): the benchmarks time
    such calls as they are."""
    for item in items:
        item.add_marker(pytest.mark.filterwarnings("ignore::camkit.BlankMapWarning"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "quick: small resnet18 cases that check the harness quickly; no gate"
    )
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when it is not available")
    config.stash[_FIGURES] = []
    config.stash[_RATIOS] = {}
    config.stash[_LOAD] = list(os.getloadavg())


@pytest.fixture(scope="session", autouse=True)
def cpu_threads() -> Iterator[None]:
    """Every figure is taken with :data:`THREADS` CPU threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def settings(request: pytest.FixtureRequest) -> Settings:
    config = request.config
    return Settings(
        rounds=max(1, config.getoption("--bench-rounds")),
        warmup=max(0, config.getoption("--bench-warmup")),
        repeats=max(1, config.getoption("--bench-repeats")),
        quiet=max(0.0, config.getoption("--bench-quiet")),
    )


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``report(line)`` prints ``line`` under this test's id in the end-of-run summary."""
    figures = request.config.stash[_FIGURES]
    node_id = request.node.nodeid

    def add(line: str) -> None:
        figures.append((node_id, line))

    return add


@pytest.fixture
def record_ratio(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record_ratio(figure, spread, comparison=None)`` stores a cost ratio (lower is better)
    under ``<test id>::<figure>`` in the ratios file the gate reads (``--bench-json``).

    Nothing is stored under ``--benchmark-disable`` (one round measures nothing)."""
    ratios = request.config.stash[_RATIOS]
    disabled = bool(request.config.getoption("benchmark_disable", False))
    node_id = request.node.nodeid

    def record(figure: str, spread: Spread, comparison: Comparison | None = None) -> None:
        if disabled:
            return
        env = environment()
        entry: dict[str, Any] = {
            "ratio": round(spread.median, 4),
            "spread": {k: v for k, v in spread.as_dict().items() if k != "median"},
            "machine": machine(),
            "torch": env["torch"],
            "commit": env["commit"],
            "load": [round(v, 2) for v in os.getloadavg()],
        }
        if comparison is not None:
            entry["rounds_used"] = len(comparison.used)
            entry["rounds"] = comparison.rounds
            entry["contended"] = comparison.contended
        ratios[f"{node_id}::{figure}"] = entry

    return record


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    ratios = config.stash.get(_RATIOS, {})
    path = config.getoption("--bench-json", RATIOS_JSON)
    if not ratios or not path:
        return
    env = environment()
    data = {
        "schema": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "torch": env["torch"],
        "torchvision": env["torchvision"],
        "python": sys.version.split()[0],
        "commit": env["commit"],
        "threads": THREADS,
        "load_at_start": [round(v, 2) for v in config.stash.get(_LOAD, [])],
        "load_at_end": [round(v, 2) for v in os.getloadavg()],
        "command": " ".join(["pytest", *config.invocation_params.args]),
        "benchmarks": dict(sorted(ratios.items())),
    }
    out = Path(path)
    if not out.is_absolute():
        out = config.invocation_params.dir / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    config.stash[_FIGURES].append(("ratios", f"{len(ratios)} ratios written to {out}"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    figures = terminalreporter.config.stash.get(_FIGURES, [])
    if not figures:
        return
    terminalreporter.section("camkit benchmark figures")
    last = None
    for node_id, line in figures:
        if node_id != last:
            terminalreporter.write_line(node_id)
            last = node_id
        terminalreporter.write_line(f"    {line}")
