"""The built-in demo: a small CNN trained on generated scenes, explained by every method.

:func:`run_demo` explains held-out scenes with every registered method and writes a grid of
overlays, the individual overlays and a table of the pointing game, class discrimination and
time per image; :func:`load_demo_model` gives the trained model and :func:`generate` the scenes.
The weights are written by ``scripts/train_demo.py``.
"""

from __future__ import annotations

from .data import CLASSES, Scenes, generate
from .model import DemoCNN, load_demo_model
from .run import TABLE_COLUMNS, run_demo

__all__ = [
    "CLASSES",
    "TABLE_COLUMNS",
    "DemoCNN",
    "Scenes",
    "generate",
    "load_demo_model",
    "run_demo",
]
