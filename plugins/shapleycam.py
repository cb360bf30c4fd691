"""Shapley-CAM: channel weights from the gradient and the Hessian-vector product.

Cai (2025), "CAMs as Shapley Value-based Explainers", arXiv:2501.06261. The score ``u(A)`` seen
as a cooperative game of the layer's activations, expanded to second order around ``A`` and
evaluated at the empty coalition, gives each activation's Shapley value in closed form,

.. math::

    \\phi(A) \\approx A \\odot \\Big(\\nabla u(A) - \\tfrac{1}{2} H(A) A\\Big), \\qquad
    w_k = \\frac{1}{Z} \\sum_{ij} \\Big(\\nabla u - \\tfrac{1}{2} H A\\Big)_{kij}, \\qquad
    L = \\mathrm{ReLU}\\Big(\\sum_k w_k A^k\\Big)

Shapley-CAM averages the bracket over positions as Grad-CAM averages the gradient (Grad-CAM is
the first-order case). ``H A`` is the Hessian-vector product of the score with respect to the
layer's activations, computed by the core with a second backward from the layer only
(``needs_hessian_vector``; ``ctx.hessian_vector``).

The paper defines the score as the residual softmax target-class utility (ReST),
``y_c + log softmax(y)_c``: pass ``target=camkit.targets.ReSTTarget(classes)``. The default
target (the class logit) gives the same method on the logit, as other CAM libraries default to.
Where the part of the model after the layer is piecewise linear in it and the score is a logit,
``H A = 0`` and Shapley-CAM is Grad-CAM.

With ``differentiable=True`` both backwards keep their graphs (``create_graph``; ``A`` is the
vector of the Hessian-vector product with its graph), so the map's gradient involves the
score's third derivative; the model after the layer must be three times differentiable for it
to be meaningful (smooth activations: tanh, GELU, SiLU).
"""

from __future__ import annotations

import torch

import camkit


class ShapleyCAM(camkit.Method):
    """Shapley-CAM channel weights: ``mean(g - H A / 2)`` over positions, ``(N, C)``."""

    name = "shapleycam"
    aliases = ("shapley-cam",)
    citation = "Cai 2025, CAMs as Shapley Value-based Explainers (arXiv:2501.06261)"
    needs_gradients = True
    needs_hessian_vector = True
    class_discriminative = True
    differentiable = True
    cost = "1 forward + 2 backwards from the layer (gradient, then Hessian-vector product)"

    def weights(self, ctx: camkit.Context) -> torch.Tensor:
        assert ctx.gradients is not None and ctx.hessian_vector is not None
        return (ctx.gradients - 0.5 * ctx.hessian_vector).flatten(2).mean(dim=2)


@camkit.hookimpl
def register_methods(register: camkit.Register) -> None:
    register(ShapleyCAM())
