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

from collections.abc import Callable, Iterator

import pytest
import torch

from benchmarks._lib import THREADS, Settings

_FIGURES = pytest.StashKey[list[tuple[str, str]]]()


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
        "--bench-repeats",
        type=int,
        default=3,
        help="fresh processes per operation in the memory benchmark (default 3)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "quick: small resnet18 cases that check the harness quickly; no gate"
    )
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when it is not available")
    config.stash[_FIGURES] = []


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
