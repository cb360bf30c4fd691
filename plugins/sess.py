"""SESS: saliency enhancing with scaling and sliding, over any base method.

Tursun, Denman, Sridharan & Fookes (2022), "SESS: Saliency Enhancing with Scaling and Sliding",
ECCV. The image is resized so that its shorter side is each of several ``scales``; windows of
``window`` pixels slide over each resized image with a step of ``step`` (the last window of a
row or column is moved back to end at the border). Each window (patch) is scored; the
``pre_filter`` fraction of patches with the lowest scores is dropped; for each kept patch ``k``
the base method's map at the layer is computed, min-max normalised to ``m_k`` and weighed by
the patch's score relative to the best patch (channel-wise weight),

.. math:: \\tilde m_k = \\frac{p_k}{\\max_j p_j} \\, \\frac{m_k - \\min m_k}{\\max m_k - \\min m_k}

placed at its window in a zero canvas of its resized image and resized back to the input's size
(``M_k``). The maps are fused by the spatially weighted average over the maps above ``theta``
at each position, then smoothed by a Gaussian (11 x 11, sigma 5) with ``smooth=True``:

.. math:: S(λ) = \\frac{\\sum_k M_k(λ) \\, [M_k(λ) > θ]}{\\sum_k [M_k(λ) > θ]}

(0 where no map exceeds ``theta``).

``p_k`` is the probability of the explained class for class targets (``score="auto"``), as in
the paper, or the target's own score. The authors' code sets the defaults: scales
``window + 64 i`` for ``i = 0 .. 11``, ``step = window``, no pre-filtering, ``theta = 0``.
camkit's ``window`` defaults to the input's shorter side (the size the model was given).

A meta-method: the base method runs on the kept patches through ``ctx.recapture`` (the layer's
activations and gradients of every kept patch, in chunks of ``batch_size``) with a context
whose ``inputs``, ``activations``, ``gradients``, ``scores`` are the patches'; base methods that
replay the part of the model after the layer (``uses_run_suffix``, Ablation-CAM) cannot run on
patches and are refused. The map is at the input's resolution (``res.raw`` ``(N, H, W)``), the
channel weights are zeros.

Cost model per sample: ``P`` patch scores (one forward each), then for the ``K`` kept patches
one forward for their target scores and one forward and backward from the layer
(``ctx.recapture``), plus the base method's own cost on ``K`` rows; ``P`` is 138 for a 224 x 224
image with the default scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import camkit
from camkit.plugin import (
    ClassTarget,
    ProbabilityTarget,
    check_bool,
    check_choice,
    check_number,
    normalize,
    upsample,
)
from camkit.plugin import progress_bar as bar


def window_starts(size: int, window: int, step: int) -> list[int]:
    """Offsets of the windows along one dimension: ``0, step, ...``; the first window that
    reaches the border is moved back to end there, and is the last."""
    starts = []
    for start in range(0, size, step):
        if start + window >= size:
            starts.append(size - window)
            break
        starts.append(start)
    return starts


def gaussian_blur(maps: Tensor, size: int = 11, sigma: float = 5.0) -> Tensor:
    """``(N, H, W)`` blurred by a separable Gaussian with mirrored borders (reflect-101)."""
    half = size // 2
    r = torch.arange(size, dtype=maps.dtype, device=maps.device) - half
    k = torch.exp(-(r * r) / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.pad(maps.unsqueeze(1), (half, half, half, half), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, 1, size))
    x = F.conv2d(x, k.reshape(1, 1, size, 1))
    return x.squeeze(1)


def _positive_ints(value: Any, name: str) -> None:
    if value is None:
        return
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise camkit.OptionError(f"option {name!r} expects None or positive ints, got {value!r}.")


class SESS(camkit.Method):
    """SESS: the base method's maps of scaled, sliding patches, fused; ``(N, H, W)``."""

    name = "sess"
    citation = (
        "Tursun, Denman, Sridharan & Fookes 2022, SESS: Saliency Enhancing with Scaling and "
        "Sliding (ECCV)"
    )
    needs_gradients = True  # ctx.recapture then gives the base method the patches' gradients
    class_discriminative = True
    cost = (
        "P patch forwards + K kept patches: 1 forward, 1 forward and backward from the layer, "
        "and the base method's cost"
    )
    options = {
        "base": "gradcam",
        "base_options": None,
        "scales": None,
        "window": None,
        "step": None,
        "pre_filter": 0.0,
        "theta": 0.0,
        "smooth": True,
        "score": "auto",
    }

    def check_options(self, options: Mapping[str, Any]) -> None:
        base = _base(options)
        if not isinstance(options["base_options"], (dict, type(None))):
            raise camkit.OptionError(
                f"option 'base_options' expects a dict of the base method's options or None, "
                f"got {options['base_options']!r}."
            )
        base.check_options(_base_options(base, options))
        _positive_ints(options["scales"], "scales")
        _positive_ints(options["window"], "window")
        _positive_ints(options["step"], "step")
        for name in ("window", "step"):
            if isinstance(options[name], (tuple, list)):
                raise camkit.OptionError(f"option {name!r} expects one int or None.")
        ratio = check_number(options, "pre_filter", minimum=0.0)
        if ratio >= 1:
            raise camkit.OptionError(
                f"option 'pre_filter' expects the fraction of patches to drop, in [0, 1); got "
                f"{ratio!r}."
            )
        check_number(options, "theta")
        check_bool(options, "smooth")
        check_choice(options, "score", ("auto", "probability", "target"))
        if options["eigen_smooth"]:
            raise camkit.OptionError(
                "sess fuses the base method's maps of many patches; eigen_smooth=True does not "
                "apply to it. Leave it out."
            )

    def weights(self, ctx: camkit.Context) -> Tensor:
        a = ctx.activations
        return a.new_zeros(a.shape[:2])  # SESS weighs no channel of the image: see combine

    def combine(self, ctx: camkit.Context, weights: Tensor) -> Tensor:
        x = ctx.inputs[0]
        if x.ndim != 4:
            raise camkit.InputError(
                f"sess slides windows over images (N, C, H, W); got an input of shape "
                f"{tuple(x.shape)}."
            )
        opts = ctx.options
        h, w = int(x.shape[2]), int(x.shape[3])
        window: int = opts["window"] or min(h, w)
        step: int = opts["step"] or window
        scales = list(opts["scales"] or [window + 64 * i for i in range(12)])
        if min(scales) < window:
            raise camkit.OptionError(
                f"option 'scales' {scales} has a shorter side below the window ({window}); "
                "every scale must be at least the window."
            )
        if opts["smooth"] and min(h, w) <= 5:
            raise camkit.InputError(
                f"smooth=True blurs with an 11 x 11 Gaussian, which needs maps of at least "
                f"6 x 6; the input is {h} x {w}. Pass smooth=False."
            )
        base = _base(opts)
        sub_options = _base_options(base, opts)
        out = []
        with bar(int(x.shape[0]), self.name, opts) as progress:
            for i in range(int(x.shape[0])):
                out.append(self._one(ctx, base, sub_options, i, (h, w), window, step, scales))
                progress.update(1)
        fused = torch.stack(out)
        return gaussian_blur(fused) if opts["smooth"] else fused

    def _one(
        self,
        ctx: camkit.Context,
        base: camkit.Method,
        sub_options: Mapping[str, Any],
        i: int,
        size: tuple[int, int],
        window: int,
        step: int,
        scales: Sequence[int],
    ) -> Tensor:
        """The fused map ``(H, W)`` of sample ``i``."""
        x, rest = ctx.inputs[0][i : i + 1], [t[i : i + 1] for t in ctx.inputs[1:]]
        h, w = size
        patches, boxes = [], []  # boxes: (scale index, y0, x0)
        resized_sizes = []
        for s_index, s in enumerate(scales):
            # the shorter side becomes s, the longer keeps the aspect ratio (torchvision Resize)
            rh, rw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            resized_sizes.append((rh, rw))
            img = x if (rh, rw) == (h, w) else F.interpolate(x, (rh, rw), mode="bilinear")
            for y0 in window_starts(rh, window, step):
                for x0 in window_starts(rw, window, step):
                    patches.append(img[..., y0 : y0 + window, x0 : x0 + window])
                    boxes.append((s_index, y0, x0))
        every = torch.cat(patches)  # (P, C, window, window)
        index = torch.full((len(every),), i, dtype=torch.long, device=x.device)
        extra = tuple(t.expand(len(every), *t.shape[1:]) for t in rest)
        p = ctx.score((every, *extra), index, _score_target(ctx)).to(x.dtype)
        relative = p / p.max()
        order = torch.argsort(p, stable=True)
        kept = order[int(len(order) * float(ctx.options["pre_filter"])) :]
        maps = self._patch_maps(ctx, base, sub_options, every[kept], extra, index[kept], window)
        maps = maps * relative[kept][:, None, None]
        theta = float(ctx.options["theta"])
        total = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        count = torch.zeros(h, w, dtype=x.dtype, device=x.device)
        for m, k in zip(maps, kept.tolist(), strict=True):
            s_index, y0, x0 = boxes[k]
            canvas = m.new_zeros(resized_sizes[s_index])
            canvas[y0 : y0 + window, x0 : x0 + window] = m
            back = upsample(canvas[None], (h, w), "bilinear")[0]
            above = back > theta
            total += torch.where(above, back, 0)
            count += above
        return torch.where(count > 0, total / count.clamp_min(1), 0)

    @staticmethod
    def _patch_maps(
        ctx: camkit.Context,
        base: camkit.Method,
        sub_options: Mapping[str, Any],
        patches: Tensor,
        extra: tuple[Tensor, ...],
        index: Tensor,
        window: int,
    ) -> Tensor:
        """The base method's min-max normalised maps of ``patches``, ``(K, window, window)``."""
        extra = tuple(t[: len(patches)] for t in extra)
        acts, grads = ctx.recapture((patches, *extra), index)
        sub = dataclasses.replace(
            ctx,
            inputs=(patches, *extra),
            activations=acts,
            gradients=grads,
            scores=ctx.score((patches, *extra), index),
            options=sub_options,
        )
        raw = base.combine(sub, base.weights(sub))
        if sub_options["relu"]:
            raw = raw.clamp_min(0)
        return normalize(upsample(raw, (window, window), "auto")).to(patches.dtype)


def _base(options: Mapping[str, Any]) -> camkit.Method:
    value = options["base"]
    base = value if isinstance(value, camkit.Method) else None
    if base is None:
        if not isinstance(value, str):
            raise camkit.OptionError(
                f"option 'base' expects a method name or a camkit.Method, got {value!r}."
            )
        try:
            base = camkit.default_registry().get(value)
        except camkit.CamkitError as exc:
            raise camkit.OptionError(f"option 'base': {exc}") from exc
    if isinstance(base, SESS) or base.uses_run_suffix:
        raise camkit.OptionError(
            f"option 'base' cannot be {base.name!r}: "
            + (
                "SESS of SESS is not defined."
                if isinstance(base, SESS)
                else "it replays the part of the model after the layer, which needs the "
                "explained inputs, not patches. Choose a gradient or Score-CAM-type method."
            )
        )
    return base


def _base_options(base: camkit.Method, options: Mapping[str, Any]) -> dict[str, Any]:
    """The base method's own options (its defaults, then ``base_options``) with the common
    ones of the call."""
    given = dict(options["base_options"] or {})
    unknown = sorted(set(given) - set(base.options))
    if unknown:
        raise camkit.OptionError(
            f"option 'base_options' has {unknown}, which {base.name!r} does not take; its "
            f"options are {sorted(base.options) or 'none'}."
        )
    return {**options, **dict(base.options), **given}


def _score_target(ctx: camkit.Context) -> Any:
    """The patch score ``p``: ``None`` keeps the call's target."""
    choice = ctx.options["score"]
    target = ctx.target
    plain_class = type(target) in (ClassTarget, ProbabilityTarget)
    if choice == "target" or (choice == "auto" and not plain_class):
        return None
    if not plain_class:
        raise camkit.TargetError(
            "score='probability' needs class targets (None, an int or one class per sample); "
            f"got a {type(target).__name__}. Use score='target'."
        )
    assert isinstance(target, (ClassTarget, ProbabilityTarget))
    return ProbabilityTarget(target.classes)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(SESS())
