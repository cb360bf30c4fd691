"""Writing a command's files atomically: a temporary folder that moves into place only when
everything succeeded.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ImageError

__all__ = [
    "staged_output",
]


def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


@contextmanager
def staged_output(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder whose files move into ``out`` when the block succeeds.

    The temporary folder sits next to ``out`` (inside it when ``out`` already exists), so the
    final move is a rename on one file system. When the block raises, the temporary folder is
    removed and ``out`` is left as it was (not created when it did not exist). Files already in
    ``out`` with other names are kept; files with the same names are replaced.

    Raises:
        ImageError: ``out`` is a file, or the folder cannot be created.
    """
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise ImageError(f"the output folder {target} exists and is not a folder.")
    existed = target.is_dir()
    base = target if existed else _existing_ancestor(target.parent)
    tmp = base / f".camkit-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise ImageError(
            f"cannot write the output folder {target}: {exc.strerror or exc} ({base})."
        ) from exc
    try:
        yield tmp
        if existed:
            files = sorted(tmp.iterdir())
            # every name checked before anything moves: all files land, or none
            taken = [f.name for f in files if (target / f.name).is_dir()]
            if taken:
                raise ImageError(
                    f"cannot write {target / taken[0]}: a folder of that name exists in the "
                    f"output folder{f' (and {len(taken) - 1} more)' if len(taken) > 1 else ''}; "
                    "rename or remove it, or choose another --out. Nothing was written."
                )
            for f in files:
                os.replace(f, target / f.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
