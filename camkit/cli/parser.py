"""The ``camkit`` argument parser and :func:`main`.

Errors a user can cause print ``camkit: error: <message>`` on stderr, without a traceback, and
exit with status 2 for a wrong command line and 1 for anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

from .. import __version__
from ..errors import CamkitError, UsageError
from .commands import demo_command, methods_command, plugins_command
from .compare import add_compare_parser
from .explain import explain_command
from .images import DEFAULT_MAX_PIXELS
from .values import floats, key_value, positive_int, size, stds, target_form

__all__ = [
    "build_parser",
    "main",
]


class _Parser(argparse.ArgumentParser):
    """``argparse`` with camkit's error line."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"camkit: error: {message}\n")


# -- the parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``camkit`` argument parser."""
    parser = _Parser(
        prog="camkit",
        description="Class activation maps for PyTorch models.",
        epilog="Run 'camkit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"camkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    ex = sub.add_parser(
        "explain",
        help="explain images with a model: overlays (.png) and maps (.npy)",
        description="Explain images with a model and a CAM method; write an overlay (.png) "
        "and the map (.npy, float32 in [0, 1] at the model's input size) per image.",
    )
    ex.add_argument("images", nargs="*", metavar="IMAGE", help="image files")
    ex.add_argument(
        "--image-path",
        dest="image_paths",
        action="append",
        default=[],
        metavar="IMAGE",
        help="an image file (repeatable), as well as or instead of the positional ones",
    )
    ex.add_argument(
        "--model",
        required=True,
        metavar="SPEC",
        help="torchvision:NAME, timm:NAME, hf:PATH (a Hugging Face model saved in a local "
        "folder, with its image processor) or module.path:factory",
    )
    ex.add_argument(
        "--weights",
        metavar="W",
        help="a torchvision weights name (DEFAULT, IMAGENET1K_V1, ...), 'pretrained' for timm, "
        "or a checkpoint file (a state_dict)",
    )
    ex.add_argument("--method", default="gradcam", help="CAM method (default: gradcam)")
    ex.add_argument("--layer", help="target layer(s), dotted names, comma-separated")
    ex.add_argument(
        "--target",
        type=target_form,
        metavar="T",
        help="class to explain: one for all images, or one per image (comma-separated); "
        "for detectors box:INDEX[@LABEL] or box:X1,Y1,X2,Y2[@LABEL] (one predicted box, by "
        "index or best IoU), for segmentation mask:C (class C over its predicted mask); "
        "default: the predicted class",
    )
    ex.add_argument(
        "--out",
        "--output-dir",
        dest="out",
        default="camkit-out",
        help="output folder (default: ./camkit-out)",
    )
    ex.add_argument(
        "--aug-smooth", action="store_true", help="test-time augmentation (option aug_smooth)"
    )
    ex.add_argument(
        "--eigen-smooth",
        action="store_true",
        help="first principal component in place of the channel sum (option eigen_smooth)",
    )
    ex.add_argument(
        "--size",
        type=size,
        metavar="H[,W]",
        help="resize images to this size (default: the weights' preprocessing, else 224)",
    )
    ex.add_argument(
        "--mean", type=floats, metavar="R,G,B", help="normalisation mean (default: ImageNet)"
    )
    ex.add_argument(
        "--std", type=stds, metavar="R,G,B", help="normalisation std (default: ImageNet)"
    )
    ex.add_argument(
        "--num-classes",
        type=positive_int,
        metavar="K",
        help="classes of the model's classifier (torchvision and timm specs)",
    )
    ex.add_argument("--labels", metavar="FILE", help="class names: one per line, or JSON")
    ex.add_argument("--alpha", type=float, default=0.5, help="heatmap weight (default: 0.5)")
    ex.add_argument("--colormap", default="jet", help="heatmap colours (default: jet)")
    ex.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        metavar="N",
        help="images per explain call (default: 8)",
    )
    ex.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=(
            "refuse images with more pixels, read from the header before decoding where the "
            f"format allows (default: {DEFAULT_MAX_PIXELS}, 8192 x 8192)"
        ),
    )
    ex.add_argument(
        "--option",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option (repeatable), e.g. --option relu=false",
    )
    _device_and_progress(ex)
    ex.add_argument("--json", action="store_true", help="print a JSON summary")
    ex.set_defaults(func=explain_command)

    me = sub.add_parser(
        "methods",
        help="list the CAM methods",
        description="List the CAM methods: name, aliases, gradients, cost and paper.",
    )
    me.add_argument("pattern", nargs="?", default="*", help="fnmatch filter (default: *)")
    me.add_argument("--json", action="store_true", help="print JSON")
    me.set_defaults(func=methods_command)

    pl = sub.add_parser(
        "plugins",
        help="list the loaded plugins as JSON",
        description="Print the loaded plugins as JSON: name, distribution, version, hooks "
        "and methods of each.",
    )
    pl.set_defaults(func=plugins_command)

    de = sub.add_parser(
        "demo",
        help="train a small model on generated scenes and explain it with every method",
        description="Train a small model on generated scenes and explain it with the methods.",
    )
    de.add_argument("--out", default="camkit-demo", help="output folder (default: ./camkit-demo)")
    de.add_argument("--methods", help="comma-separated method names (default: all)")
    de.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _device_and_progress(de)
    de.add_argument("--json", action="store_true", help="print the table as JSON")
    de.set_defaults(func=demo_command)

    add_compare_parser(sub)
    return parser


def _device_and_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N"
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars (default: on in a terminal for long work)",
    )


# -- main ------------------------------------------------------------------------------------
class _Terminated(BaseException):
    """SIGTERM, raised where the program runs so that cleanup (``finally``) happens."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`_Terminated` (main thread only): a command
    stopped by ``kill`` or a job scheduler removes its temporary folder as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _one_line(exc: BaseException) -> str:
    """The message on one line, whatever it quotes."""
    return " ".join(str(exc).split("\n"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``camkit`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit
    status."""
    parser = build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with _terminate_as_exception():
            code = func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except UsageError as exc:
        print(f"camkit: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except CamkitError as exc:
        print(f"camkit: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("camkit: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("camkit: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # output piped into a command that stopped reading (head)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
