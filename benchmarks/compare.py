"""The regression gate: compare a run's ratios with the committed baseline.

::

    python -m benchmarks.compare NEW.json [--baseline FILE] [--tolerance 0.05]

``NEW.json`` is what a run of the suite writes (``--bench-json``, by default
``.benchmarks/ratios.json``); the baseline is ``benchmarks/baseline.json``. Every figure is a
cost ratio (a time or a memory growth over a reference measured in the same run), so lower is
better. Prints a table (baseline, new, change, verdict) and exits 1 when a figure of the
baseline grew by more than ``tolerance`` (a share: 0.05 is 5%) or is missing from the new run;
figures only in the new run are listed as ``new`` and pass. Exit 2: a file could not be read.

Reads JSON only (no torch), so the gate runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).with_name("baseline.json")
"""The committed baseline."""

SCHEMA = 1
"""Version of the ratios file format."""


@dataclass(frozen=True)
class Row:
    """One figure's comparison."""

    name: str
    baseline: float | None
    new: float | None
    verdict: str  # "ok", "faster", "REGRESSED", "MISSING", "new"

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.new is None or self.baseline == 0:
            return None
        return self.new / self.baseline - 1

    @property
    def failed(self) -> bool:
        return self.verdict in ("REGRESSED", "MISSING")


def load(path: Path) -> dict[str, Any]:
    """The ``benchmarks`` mapping (name -> entry with a ``ratio``) of a ratios file."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict):
        raise ValueError(
            f"{path}: expected a ratios file (an object with a 'benchmarks' mapping, as the "
            "suite's --bench-json writes); got something else. A pytest-benchmark "
            "--benchmark-json file is not a ratios file."
        )
    benchmarks: dict[str, Any] = data["benchmarks"]
    for name, entry in benchmarks.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ratio"), (int, float)):
            raise ValueError(f"{path}: entry {name!r} has no numeric 'ratio'.")
    return benchmarks


def compare(
    baseline: Mapping[str, Mapping[str, Any]],
    new: Mapping[str, Mapping[str, Any]],
    tolerance: float = 0.05,
) -> list[Row]:
    """One :class:`Row` per figure of either file, the baseline's first, in name order."""
    rows = []
    for name in sorted(baseline):
        old = float(baseline[name]["ratio"])
        if name not in new:
            rows.append(Row(name, old, None, "MISSING"))
            continue
        value = float(new[name]["ratio"])
        if value > old * (1 + tolerance):
            verdict = "REGRESSED"
        elif value < old * (1 - tolerance):
            verdict = "faster"
        else:
            verdict = "ok"
        rows.append(Row(name, old, value, verdict))
    rows += [
        Row(name, None, float(new[name]["ratio"]), "new")
        for name in sorted(new)
        if name not in baseline
    ]
    return rows


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = ["| benchmark | baseline | new | change | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        change = "-" if r.change is None else f"{100 * r.change:+.1f}%"
        lines.append(f"| {r.name} | {fmt(r.baseline)} | {fmt(r.new)} | {change} | {r.verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="Compare a run's ratios with the baseline; exit 1 on a regression.",
    )
    parser.add_argument("new", type=Path, help="ratios JSON of the run (--bench-json)")
    parser.add_argument("--baseline", type=Path, default=BASELINE, help=f"default {BASELINE}")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="allowed growth of a ratio, as a share (default 0.05: 5%%)",
    )
    args = parser.parse_args(argv)
    try:
        baseline, new = load(args.baseline), load(args.new)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = compare(baseline, new, args.tolerance)
    print(table(rows))
    failed = [r for r in rows if r.failed]
    regressed = sum(r.verdict == "REGRESSED" for r in failed)
    print(
        f"\n{len(rows)} figures, tolerance {100 * args.tolerance:g}%: "
        f"{regressed} regressed, {len(failed) - regressed} missing"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
