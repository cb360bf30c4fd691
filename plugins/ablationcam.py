"""Ablation-CAM.

Desai & Ramaswamy (2020), "Ablation-CAM: Visual Explanations for Deep Convolutional Network via
Gradient-free Localization", WACV. Eq. 3: the weight of channel ``k`` is the relative drop of the
target score when that channel is zeroed,

.. math:: w_k = \\frac{y - y_k}{y}

with ``y`` the score and ``y_k`` the score with activation map ``k`` set to zero.

Cost model: the ablated copies go through ``ctx.run_suffix``, which runs the part of the model
before the layer once and only the part after it per copy (``batch_size - 1`` copies at a
time); ``uses_run_suffix`` lets the explained forward record that part and check the replay
(the check's forward of one perturbed row runs on the first call per model and input
signature; a passed check is remembered), so at the last block the cost is about one and a
half inferences whatever the number of channels; at an early layer the suffix is most of the
model and the cost approaches ``C`` forwards. Channels
whose activations are all zero cannot change the score when zeroed: their weight is exactly 0
and they are not run.

Precision: a weight is the difference of two nearly equal scores, and the map sums such weights
with mixed signs. Each replay therefore scores the unablated sample beside its copies
(``batch_size - 1`` copies and the sample) and takes the drops from that score, computed by the
same kernels in the same batch: in float32, maps from different ``batch_size`` agree to about
2e-5 of their maximum (about 1e-3 when the drops are taken from the explained forward's
score); in float64 to 1e-9.

Departure from the paper: for ``y <= 0`` dividing by ``y`` flips the sign of every weight and
with it the map. camkit divides by ``|y|`` (``denominator="abs"``, the default), which is the
paper's form wherever ``y > 0``; ``denominator="paper"`` divides by ``y``. Where ``y = 0``, the
difference ``y - y_k`` is used as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import camkit
from camkit.plugin import chunk_spans
from camkit.plugin import progress_bar as bar


class AblationCAM(camkit.Method):
    """Ablation-CAM channel weights ``(y - y_k) / |y|``, ``(N, C)``."""

    name = "ablationcam"
    aliases = ("ablation-cam",)
    citation = (
        "Desai & Ramaswamy 2020, Ablation-CAM: Visual Explanations for Deep Convolutional "
        "Network via Gradient-free Localization (WACV)"
    )
    needs_gradients = False
    uses_run_suffix = True
    class_discriminative = True
    cost = (
        "1 forward (explained, recording the prefix) + C ablated copies through the part after "
        "the layer; the first call per model and input signature also 1 forward of one checked "
        "copy"
    )
    options = {"denominator": "abs"}

    def check_options(self, options: Mapping[str, Any]) -> None:
        if options["denominator"] not in ("abs", "paper"):
            raise camkit.OptionError(
                f"option 'denominator' expects 'abs' or 'paper', got {options['denominator']!r}."
            )

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        a = ctx.activations
        n, c = a.shape[:2]
        device = a.device
        drops = torch.zeros(n, c, dtype=a.dtype, device=device)
        live = a.flatten(2).ne(0).any(dim=2)  # (N, C): channels that can change the score
        batch_size, work = ctx.options["batch_size"], ("suffix", ctx.layer)
        with bar(int(live.sum()), "ablation-cam", ctx.options) as progress:
            for i in range(n):
                channels = live[i].nonzero().flatten()
                # one buffer per sample, grown to the largest span: each replay zeroes its
                # channels in `k` copies and puts them back after (no new tensor per replay);
                # the row after them is the unablated sample, and `reserve=1` keeps it in the
                # copies' replay (`k + 1` rows), so the drops come from scores of one batch and
                # kernel rounding that depends on the batch size cancels
                copies = a.new_empty((0, *a.shape[1:]))
                for start, stop in chunk_spans(
                    batch_size, len(channels), a[:1], ctx.model, work=work, reserve=1
                ):
                    ks = channels[start:stop]
                    k = len(ks)
                    if copies.shape[0] < k + 1:
                        copies = a[i].expand(k + 1, *a.shape[1:]).clone()
                    rows = torch.arange(k, device=device)
                    copies[rows, ks] = 0
                    index = torch.full((k + 1,), i, dtype=torch.long, device=device)
                    scores = ctx.run_suffix(copies[: k + 1], index)
                    copies[rows, ks] = a[i, ks]
                    if not bool(torch.isfinite(scores).all()):
                        raise camkit.TargetError(
                            f"{self.name}: the scores of ablated copies of sample {i} are not "
                            f"finite ({scores.flatten()[:4].tolist()}...): the model overflows "
                            "or divides by zero when channels of the layer are zeroed. Check "
                            "the model on such activations; for float16 models, try float32."
                        )
                    drops[i, ks] = scores[k].to(a.dtype) - scores[:k].to(a.dtype)
                    progress.update(k)
        y = ctx.scores.to(a.dtype)
        denom = y.abs() if ctx.options["denominator"] == "abs" else y
        denom = torch.where(denom == 0, torch.ones_like(denom), denom)
        return drops / denom[:, None]


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(AblationCAM())
