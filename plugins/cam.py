"""CAM: class activation mapping with the classifier's weights.

Zhou, Khosla, Lapedriza, Oliva & Torralba (2016), "Learning Deep Features for Discriminative
Localization", CVPR. For a network that ends in global average pooling and a linear layer,
``y^c = sum_k W_{ck} mean_ij A^k_ij + b_c``, and the map of class ``c`` is (eq. 2)

.. math:: M_c = \\sum_k W_{ck} \\, A^k

The weights are the classifier row of the target class, ``(N, C)``. The head (the linear layer)
is found automatically: a ``nn.Linear`` of the model with ``C`` inputs whose output, computed
from the pooled activations, reproduces the explained scores (so a head that is not
pooling-then-linear is never used silently). Name it with ``fc="..."`` to skip the search. A
model without such a head is an error: use Grad-CAM, which equals CAM on such models.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import camkit


def _classes(ctx: camkit.Context) -> torch.Tensor:
    """The class each sample is explained for, asked of the target (``class_indices``)."""
    ask = getattr(ctx.target, "class_indices", None)
    classes: torch.Tensor | None = ask(int(ctx.activations.shape[0])) if callable(ask) else None
    if classes is None:
        raise camkit.TargetError(
            "CAM explains one class per sample with that class's classifier weights: target "
            "expects None, an int, one class per sample or a target whose class_indices(n) "
            f"names them; got a {type(ctx.target).__name__}, which scores no single class. "
            "Use method='gradcam' for other targets."
        )
    return classes.to(ctx.activations.device)


class CAM(camkit.Method):
    """Classifier weights of the target class, ``(N, C)``."""

    name = "cam"
    differentiable = True
    citation = "Zhou et al. 2016, Learning Deep Features for Discriminative Localization (CVPR)"
    needs_gradients = False
    class_discriminative = True
    cost = "1 forward"
    options = {"fc": None}

    def check_options(self, options: Mapping[str, Any]) -> None:
        fc = options["fc"]
        if fc is not None and not isinstance(fc, (str, nn.Linear)):
            raise camkit.OptionError(
                f"option 'fc' expects the name of the classifier's nn.Linear or the module, "
                f"got {type(fc).__name__}."
            )

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        classes = _classes(ctx)
        a = ctx.activations
        pooled = a.flatten(2).mean(dim=2)  # (N, C)
        fc = ctx.options["fc"]
        names = {m: n for n, m in ctx.model.named_modules()}
        if fc is not None:
            head = dict(ctx.model.named_modules()).get(fc) if isinstance(fc, str) else fc
            if not isinstance(head, nn.Linear):
                raise camkit.LayerError(
                    f"option fc={fc!r} does not name an nn.Linear of the model; pass the "
                    "classifier's dotted name (camkit.layers(model, x) lists modules)."
                )
            candidates = [head]
        else:
            candidates = [
                m
                for m in ctx.model.modules()
                if isinstance(m, nn.Linear) and m.in_features == a.shape[1]
            ]
        for head in candidates:
            if head.in_features != a.shape[1]:
                continue
            w = head.weight.detach().to(a.dtype)
            b = head.bias.detach().to(a.dtype) if head.bias is not None else 0.0
            rows = torch.arange(a.shape[0], device=a.device)
            predicted = (pooled @ w.T + b)[rows, classes]
            if torch.allclose(predicted, ctx.scores.to(a.dtype), rtol=1e-3, atol=1e-4):
                return w[classes]
        tried = ", ".join(repr(names.get(h, "?")) for h in candidates) or "none"
        raise camkit.LayerError(
            f"CAM needs the model to end in global average pooling and a linear layer after "
            f"layer {ctx.layer!r} ({a.shape[1]} channels); no nn.Linear reproduces the scores "
            f"from the pooled activations (tried: {tried}). Pass fc='name' if the head is "
            "there, or use method='gradcam', which equals CAM on such models."
        )


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(CAM())
