"""Fuzzing the command line's image input: corrupt, empty, truncated, huge-header and
unusual-path images.

Whatever the file, ``camkit explain`` either succeeds or fails with a non-zero exit status, one
line on stderr and nothing written (no output folder, no temporary folder left behind).
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from camkit.cli import main

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

TINY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 3),
    )
"""

PREP = ["--size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--no-progress"]


def _png_bytes(h: int = 24, w: int = 20, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return bytes(buf)


def _jpeg_bytes() -> bytes:
    rng = np.random.default_rng(1)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (24, 20, 3), dtype=np.uint8))
    assert ok
    return bytes(buf)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(width: int, height: int) -> bytes:
    """A well-formed PNG header claiming ``width x height`` RGB pixels, with a few of them."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + b"\x00" * 3 * min(width, 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(row * 4))
        + _chunk(b"IEND", b"")
    )


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"fuzznet_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    yield f"{name}:build"
    sys.modules.pop(name, None)


def _explain(
    capsys: pytest.CaptureFixture[str], model: str, out: Path, *images: Any, extra: Any = ()
) -> tuple[int, str, str]:
    argv = ["explain", *map(str, images), "--model", model, *PREP, "--out", str(out), *extra]
    code = main(argv)
    stdout, stderr = capsys.readouterr()
    return code, stdout, stderr


def _assert_clean_failure(code: int, err: str, out: Path) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("camkit: note:")]
    assert len(lines) == 1 and lines[0].startswith("camkit: error: "), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(out.parent.glob(".camkit-*")), "a temporary folder was left behind"


CORRUPT: dict[str, bytes] = {
    "empty.png": b"",
    "noise.png": bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)),
    "text.jpg": b"this is not an image\n",
    "header-only.png": _png_bytes()[:33],
    "truncated.png": _png_bytes()[: len(_png_bytes()) // 2],
    "truncated.jpg": _jpeg_bytes()[: len(_jpeg_bytes()) // 3],
    "png-as-jpg.jpg": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
    "huge-header.png": _huge_png(2**16, 2**16),
    "huge-width.png": _huge_png(2**31 - 1, 1),
    "zero-size.png": _huge_png(0, 0),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_images_fail_cleanly(
    name: str, tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / name
    bad.write_bytes(CORRUPT[name])
    good = tmp_path / "good.png"
    good.write_bytes(_png_bytes())
    out = tmp_path / "out"
    code, _, err = _explain(capsys, tiny, out, good, bad)
    _assert_clean_failure(code, err, out)
    assert name in err


def _unusual(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "folder.png"
    folder.mkdir()
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    unreadable = tmp_path / "unreadable.png"
    unreadable.write_bytes(_png_bytes())
    unreadable.chmod(0)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    return {
        "missing": tmp_path / "missing.png",
        "folder": folder,
        "loop": loop,
        "dangling": dangling,
        "unreadable": unreadable,
        "newline": tmp_path / "new\nline.png",
        "fifo": fifo,
        "device": Path("/dev/zero"),
    }


@pytest.mark.parametrize(
    "kind",
    ["missing", "folder", "loop", "dangling", "unreadable", "newline", "fifo", "device"],
)
def test_unusual_paths_fail_cleanly(
    kind: str, tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "unreadable" and os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = _unusual(tmp_path)[kind]
    good = tmp_path / "good.png"
    good.write_bytes(_png_bytes())
    out = tmp_path / "out"
    code, _, err = _explain(capsys, tiny, out, good, path)
    _assert_clean_failure(code, err, out)


def test_unusual_but_valid_names_work(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["spaced name.png", "ünïcödé.png", "-dash.png", "dots.in.name.png", "UPPER.PNG"]
    for n in names:
        (tmp_path / n).write_bytes(_png_bytes())
    out = tmp_path / "out"
    code, _, err = _explain(capsys, tiny, out, *(f"./{n}" for n in names))
    assert code == 0, err
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 * len(names)
    for n in names:
        assert f"{Path(n).stem}_gradcam.npy" in written


def test_pixel_limit_refuses_a_small_file_that_decodes_huge(
    tiny: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 4097 x 4097 blank PNG is a few KiB on disk and 48 MiB decoded."""
    img = np.zeros((4097, 4097, 3), np.uint8)
    big = tmp_path / "bomb.png"
    assert cv2.imwrite(str(big), img, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert big.stat().st_size < 200_000
    out = tmp_path / "out"
    code, _, err = _explain(capsys, tiny, out, big, extra=["--max-pixels", str(4096 * 4096)])
    _assert_clean_failure(code, err, out)
    assert "--max-pixels" in err and "16785409" in err
    # raising the limit deliberately lets it through
    code, _, err = _explain(capsys, tiny, out, big, extra=["--max-pixels", str(4097 * 4097)])
    assert code == 0, err


def _mutations() -> Any:
    base = _png_bytes(12, 10)
    return st.one_of(
        st.integers(0, len(base)).map(lambda n: base[:n]),  # truncated
        st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), max_size=8).map(
            lambda edits: _edit(base, edits)
        ),
        st.binary(max_size=200).map(lambda tail: base[:16] + tail),  # a PNG start, then noise
    )


def _edit(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(base)
    for i, v in edits:
        data[i] = v
    return bytes(data)


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(data=_mutations())
def test_mutated_images_succeed_or_fail_cleanly(data: bytes, tmp_path_factory: Any) -> None:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "fuzznet_mut.py").write_text(TINY)
    image = root / "mutated.png"
    image.write_bytes(data)
    out = root / "out"
    import contextlib
    import io

    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    sys.path.insert(0, str(root))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["explain", str(image), "--model", "fuzznet_mut:build", *PREP, "--out",
                         str(out)])  # fmt: skip
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))
        sys.modules.pop("fuzznet_mut", None)
    if code == 0:
        assert sorted(p.name for p in out.iterdir()) == [
            "mutated_gradcam.npy",
            "mutated_gradcam.png",
        ]
    else:
        _assert_clean_failure(code, err.getvalue(), out)
