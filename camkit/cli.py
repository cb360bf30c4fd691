"""The ``camkit`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``camkit`` command."""
    print("camkit: no command available yet", file=sys.stderr)
    return 2
