"""camkit: class activation maps for any PyTorch model.

Every CAM method is a plugin computing channel weights; the core captures activations and
gradients for one call, forms the weighted sum and returns :class:`CamResult`.
"""

from __future__ import annotations

from collections.abc import Callable

from . import plugin
from .compare import compare
from .comparison import Comparison
from .errors import (
    BlankMapWarning,
    CamkitError,
    CamkitWarning,
    InputError,
    LayerError,
    ModelError,
    OptionError,
    PluginError,
    TargetError,
    UnknownLayerError,
    UnknownMethodError,
    UnknownMetricError,
)
from .evaluate import evaluate
from .explain import Explainer, explain
from .guided import guided_backprop, guided_gradcam
from .hookspecs import hookimpl
from .layers import LayerInfo, layers
from .method import Context, Method
from .metric import Metric, MetricContext, MetricResult
from .options import COMMON_OPTIONS
from .registry import Registry, default_registry, list_methods, list_metrics
from .result import CamResult
from .targets import ClassTarget, Target
from .viz import grid, overlay, save_image

#: The type of the ``register`` callback a plugin's ``register_methods`` receives.
Register = Callable[[Method], None]

__version__ = "0.1.0"

__all__ = [
    "COMMON_OPTIONS",
    "BlankMapWarning",
    "CamResult",
    "CamkitError",
    "CamkitWarning",
    "ClassTarget",
    "Comparison",
    "Context",
    "Explainer",
    "InputError",
    "LayerError",
    "LayerInfo",
    "Method",
    "Metric",
    "MetricContext",
    "MetricResult",
    "ModelError",
    "OptionError",
    "PluginError",
    "Register",
    "Registry",
    "Target",
    "TargetError",
    "UnknownLayerError",
    "UnknownMethodError",
    "UnknownMetricError",
    "__version__",
    "compare",
    "default_registry",
    "evaluate",
    "explain",
    "grid",
    "guided_backprop",
    "guided_gradcam",
    "hookimpl",
    "layers",
    "list_methods",
    "list_metrics",
    "overlay",
    "plugin",
    "save_image",
]
