"""Progress bars for long work: on in a terminal for long runs, quiet otherwise."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

__all__ = ["bar"]

#: Forwards at or above which ``progress=None`` shows a bar (when stderr is a terminal).
LONG_RUN = 256


def bar(total: int, desc: str, options: Mapping[str, Any] | bool | None = None) -> Any:
    """A ``tqdm`` bar over ``total`` units of work, or a disabled one.

    Args:
        total: units of work (for example rows to score).
        desc: a short label.
        options: the call's options (their ``progress`` entry is used) or the value itself:
            ``True`` shows the bar, ``False`` hides it, ``None`` shows it when stderr is a
            terminal and ``total >= LONG_RUN``.
    """
    flag = options.get("progress") if isinstance(options, Mapping) else options
    on = flag if flag is not None else (sys.stderr.isatty() and total >= LONG_RUN)
    return tqdm(total=total, desc=desc, disable=not on, leave=False, file=sys.stderr)
