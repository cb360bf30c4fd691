"""camkit's benchmark suite (pytest-benchmark): latency, hook overhead, memory, GPU throughput.

Run from the repository root with ``python -m pytest benchmarks/ -p no:randomly``; see
``docs/benchmarks.md``. A package, so that the test modules share :mod:`benchmarks._lib`
under ``--import-mode=importlib``.
"""
