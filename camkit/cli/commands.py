"""The ``methods``, ``plugins`` and ``demo`` commands."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import CamkitError
from ..registry import default_registry
from .values import method_named, resolve_device

__all__ = [
    "demo_command",
    "methods_command",
    "plugins_command",
    "print_table",
]


# -- methods, plugins ------------------------------------------------------------------------
def methods_command(args: argparse.Namespace) -> int:
    """``camkit methods [PATTERN] [--json]``: the matching methods as a table or JSON."""
    registry = default_registry()
    rows: list[dict[str, Any]] = []
    for name in registry.names(args.pattern):
        m = registry.get(name)
        rows.append(
            {
                "name": m.name,
                "aliases": list(m.aliases),
                "needs_gradients": m.needs_gradients,
                "class_discriminative": m.class_discriminative,
                "cost": m.cost,
                "paper": m.citation,
                "options": {k: v for k, v in m.options.items()},
                "plugin": registry.owner(name),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2, default=repr))
        return 0
    if not rows:
        raise CamkitError(f"no method matches {args.pattern!r}; run 'camkit methods' for all.")
    table = [
        [
            r["name"],
            ", ".join(r["aliases"]) or "-",
            "yes" if r["needs_gradients"] else "no",
            r["cost"] or "-",
            r["paper"] or "-",
        ]
        for r in rows
    ]
    print_table(["method", "aliases", "gradients", "cost", "paper"], table)
    return 0


def plugins_command(args: argparse.Namespace) -> int:
    """``camkit plugins``: the loaded plugins as JSON."""
    print(json.dumps(default_registry().plugins(), indent=2))
    return 0


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print ``rows`` under ``header`` in left-aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(r, widths, strict=True)]
        print("  ".join(cells).rstrip())


# -- demo ------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "-" if v is None else str(v)


def demo_command(args: argparse.Namespace) -> int:
    """``camkit demo``: run :func:`camkit.demo.run_demo` and print its table."""
    methods = None
    if args.methods:
        methods = [method_named(m).name for m in args.methods.split(",") if m.strip()]
    device = resolve_device(args.device)
    try:
        demo = importlib.import_module("camkit.demo")
    except ImportError as exc:
        raise CamkitError(f"the demo cannot be imported: {exc}; reinstall camkit.") from exc
    run_demo = getattr(demo, "run_demo", None)
    if run_demo is None:
        raise CamkitError(
            "this installation of camkit has no demo (camkit.demo.run_demo is missing); "
            "reinstall camkit."
        )
    out = Path(args.out)
    rows = run_demo(
        out, methods=methods, device=str(device), progress=args.progress, seed=args.seed
    )
    rows = list(rows or [])
    if args.json:
        print(json.dumps({"out": str(out), "rows": rows}, indent=2, default=str))
        return 0
    if rows:
        header: list[str] = []
        for r in rows:
            header += [k for k in r if k not in header]
        print_table(header, [[_cell(r.get(k)) for k in header] for r in rows])
        print()
    print(f"files in {out}")
    return 0
