"""ROAD: RemOve And Debias (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML).

For each percentile ``p`` the ``p`` % most relevant pixels (MoRF) or least relevant pixels (LeRF)
of the map are removed and filled by **noisy linear imputation**: every removed pixel takes the
weighted mean of its 8 neighbours inside the image (weights 1/6 for the 4 direct neighbours,
1/12 for the diagonals), removed neighbours included, which is one sparse linear system per
image and channel; Gaussian noise of standard deviation ``noise`` is then added to the filled
pixels (one noise image per order and percentile, drawn from the call's seed and shared by
the samples, so that a sample's value does not depend on the batch it is in). The filled image
carries no information about where the pixels were removed, which is
what makes the test fair.

The reference code solves the system with one direct sparse solve per image and percentile on
the CPU. Here every image, channel and percentile of a chunk is solved at once on the model's
device (on a CPU a few images at a time, so that the vectors stay in the cache), by flexible
conjugate gradients (the system is symmetric positive definite) preconditioned by a geometric
multigrid V-cycle: one Jacobi sweep before and after, the residual summed over 2 x 2 blocks,
a bilinear correction back, a coarse cell removed only when all its pixels are (so that a kept
pixel keeps its cell known on every grid), and a direct (Cholesky) solve on the coarsest grid
(at most 16 cells a side). The domain is the removed pixels' bounding box, widened to whole
cells of the coarsest grid. A system stops once an iteration changes none of its filled values
by more than ``tolerance`` (default 1e-3, a tenth of the noise's default standard deviation):
each iteration divides the error by about 3, so the error left is a few times smaller (within
5e-4 of a scipy direct solve on 224 x 224 images of standard deviation 1, about 10 iterations).

The score is the explained class's softmax probability of the filled image (the paper reports
the accuracy over a dataset, the mean of a correct/incorrect indicator per image; a probability
per image keeps one value per sample and the same ordering of methods). ``road-morf``: mean over
the percentiles, lower is better; ``road-lerf``: higher is better; ``road``: the mean of
``(LeRF - MoRF) / 2`` over the percentiles, higher is better (a single figure combining both
orders, as pytorch-grad-cam's ROADCombined reports; not in the paper).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import camkit
from camkit import plugin

#: The paper's neighbour weights: direct neighbours 1/6, diagonal ones 1/12 (centre unused).
WEIGHTS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))
#: Grids with at most this many cells a side are solved directly (a batched Cholesky solve).
COARSEST = 16
#: On a CPU, images are solved in chunks of about this many values (1 MiB in float32).
CPU_CHUNK = 2**18


def _box(v: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """``s`` <- the ``[1, 2, 1] x [1, 2, 1]`` window sum of the zero-bordered ``v``
    ``(B, C, h + 2, w + 2)``, that is ``12 x`` the neighbours' weighted sum (:data:`WEIGHTS`)
    ``+ 4 x`` the centre; ``s`` ``(B, C, h, w)``, ``t`` ``(B, C, h + 2, w)`` scratch. Four
    passes, no allocation."""
    torch.add(v[..., :-2], v[..., 2:], out=t)
    t.add_(v[..., 1:-1], alpha=2)
    torch.add(t[..., :-2, :], t[..., 2:, :], out=s)
    return s.add_(t[..., 1:-1, :], alpha=2)


def _inner(v: Tensor) -> Tensor:
    """The cells of a zero-bordered ``(..., h + 2, w + 2)`` grid, ``(..., h, w)``."""
    return v[..., 1:-1, 1:-1]


class _Grid:
    """One grid of the multigrid hierarchy, for the removed cells ``u`` ``(B, 1, h, w)`` (0/1
    floats): the operator ``A v = u (d v - N v)`` (``N v`` the neighbours' weighted sum inside
    the grid, ``d`` their summed weights) and the buffers of a V-cycle for ``channels``
    right-hand sides per mask. Vectors are zero-bordered, ``(B, C, h + 2, w + 2)``."""

    def __init__(self, u: Tensor, channels: int, coarsest: bool) -> None:
        b, _, h, w = u.shape
        self.shape = (h, w)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=u.dtype, device=u.device)

        def empty(*shape: int) -> Tensor:  # buffers written whole before they are read
            return torch.empty(shape, dtype=u.dtype, device=u.device)

        pad = (1, 1, 1, 1)
        d = _box(F.pad(zeros(1, 1, h, w) + 1, pad), zeros(1, 1, h + 2, w), zeros(1, 1, h, w))
        d = d / 12 - 1 / 3  # since N v = box(v) / 12 - v / 3
        self.u = F.pad(u, pad)
        self.a = F.pad(u * (d + 1 / 3), pad)  # A v = a v - u12 box(v)
        self.u12 = u / 12
        self.jacobi = F.pad(u / d, pad)  # one Jacobi step: z += r / d on the removed cells
        self.t, self.s = empty(b, channels, h + 2, w), empty(b, channels, h, w)
        self.res, self.z = empty(b, channels, h + 2, w + 2), empty(b, channels, h + 2, w + 2)
        self.r = zeros(b, channels, h + 2, w + 2)  # its border stays zero
        self.chol: Tensor | None = None
        if coarsest:
            n = h * w  # A's columns: A applied to every unit vector of the removed cells
            e = F.pad(torch.eye(n, dtype=u.dtype, device=u.device).reshape(1, n, h, w) * u, pad)
            cols = self.apply(e, torch.empty_like(e), empty(b, n, h + 2, w), empty(b, n, h, w))
            m = _inner(cols).reshape(b, n, n).transpose(1, 2)
            # known cells: identity rows; an image without a known cell: identity (no solution)
            free = (1 - u).reshape(b, n)
            free = free + (free.sum(1, keepdim=True) == 0).to(u.dtype)
            self.chol = torch.linalg.cholesky(m + torch.diag_embed(free))
        else:
            hc, wc = (h + 1) // 2, (w + 1) // 2
            self.hh, self.e = empty(b, channels, hc + 2, 2 * wc), empty(b, channels, 2 * hc, 2 * wc)

    def apply(
        self, v: Tensor, out: Tensor, t: Tensor | None = None, s: Tensor | None = None
    ) -> Tensor:
        """``out`` <- ``A v``."""
        box = _box(v, self.t if t is None else t, self.s if s is None else s)
        torch.mul(v, self.a, out=out)
        _inner(out).addcmul_(box, self.u12, value=-1)
        return out

    def residual(self, r: Tensor, z: Tensor) -> Tensor:
        """``self.res`` <- ``r - A z``."""
        box = _box(z, self.t, self.s)
        torch.addcmul(r, self.a, z, value=-1, out=self.res)
        _inner(self.res).addcmul_(box, self.u12)
        return self.res

    def restrict(self, coarse: _Grid) -> None:
        """``coarse.r`` <- the sum of ``self.res`` over each 2 x 2 block, on the coarse grid's
        removed cells (4 x the mean: ``A`` on a grid twice as coarse is 4 times ``A`` for
        smooth vectors)."""
        hc, wc = coarse.shape
        out, res = _inner(coarse.r), self.res
        odd, even = (slice(1, 2 * hc + 1, 2), slice(2, 2 * hc + 2, 2))
        codd, ceven = (slice(1, 2 * wc + 1, 2), slice(2, 2 * wc + 2, 2))
        torch.add(res[..., odd, codd], res[..., even, codd], out=out)
        out.add_(res[..., odd, ceven]).add_(res[..., even, ceven])
        out.mul_(_inner(coarse.u))

    def prolong_add(self, zc: Tensor, z: Tensor) -> None:
        """``z`` += ``u`` x the bilinear (cell-centred) interpolation of the coarse ``zc``,
        constant beyond the borders."""
        zc[..., 0, :], zc[..., -1, :] = zc[..., 1, :], zc[..., -2, :]
        zc[..., 0], zc[..., -1] = zc[..., 1], zc[..., -2]
        hh, e = self.hh, self.e  # along the rows, then along the columns
        for k, side in ((0, zc[..., :-2]), (1, zc[..., 2:])):
            torch.mul(zc[..., 1:-1], 0.75, out=hh[..., k::2]).add_(side, alpha=0.25)
        for k, side in ((0, hh[..., :-2, :]), (1, hh[..., 2:, :])):
            torch.mul(hh[..., 1:-1, :], 0.75, out=e[..., k::2, :]).add_(side, alpha=0.25)
        h, w = self.shape
        _inner(z).addcmul_(self.e[..., :h, :w], _inner(self.u))


def _hierarchy(u: Tensor, channels: int, depth: int) -> list[_Grid]:
    """The grids for the removed pixels ``u`` ``(B, 1, H, W)`` and ``depth`` halvings: a coarse
    cell is removed when all its pixels are (a grid border past an odd size counts as removed),
    so a kept pixel keeps its cell known at every level."""
    grids = [_Grid(u, channels, depth == 0)]
    for level in range(depth):
        h, w = u.shape[-2:]
        u = F.pad(u, (0, w % 2, 0, h % 2), value=1.0)
        u = u[..., 0::2, 0::2] * u[..., 1::2, 0::2] * u[..., 0::2, 1::2] * u[..., 1::2, 1::2]
        grids.append(_Grid(u, channels, level == depth - 1))
    return grids


def _cycle(grids: Sequence[_Grid], r: Tensor, z: Tensor) -> None:
    """``z`` <- one multigrid V-cycle's approximation of ``A^-1 r`` on ``grids[0]``: a Jacobi
    sweep, the residual restricted, the coarse correction by recursion (a direct solve on the
    coarsest grid), interpolated back, a Jacobi sweep."""
    g = grids[0]
    if g.chol is not None:
        b, c = r.shape[:2]
        rhs = _inner(r).reshape(b, c, -1).transpose(1, 2)
        _inner(z).copy_(torch.cholesky_solve(rhs, g.chol).transpose(1, 2).reshape(_inner(z).shape))
        return
    coarse = grids[1]
    torch.mul(r, g.jacobi, out=z)
    g.residual(r, z)
    g.restrict(coarse)
    _cycle(grids[1:], coarse.r, coarse.z)
    g.prolong_add(coarse.z, z)
    z.addcmul_(g.residual(r, z), g.jacobi)


def _depth(h: int, w: int) -> int:
    """Halvings until an ``h x w`` grid has at most :data:`COARSEST` cells a side."""
    depth = 0
    while max(h, w) > COARSEST:
        h, w, depth = (h + 1) // 2, (w + 1) // 2, depth + 1
    return depth


def _solve(img: Tensor, u: Tensor, depth: int, tolerance: float, max_iter: int) -> Tensor:
    """The imputed values ``(B, C, h, w)`` of the removed pixels ``u`` ``(B, 1, h, w)`` of
    ``img``, every channel its own system: flexible conjugate gradients preconditioned by
    :func:`_cycle`, each system stopped when an iteration changed none of its values by more
    than ``tolerance``, when that change stops shrinking (round-off), or after ``max_iter``."""
    grids = _hierarchy(u, img.shape[1], depth)
    g = grids[0]
    known = img * (1 - u)
    r = torch.zeros_like(F.pad(known, (1, 1, 1, 1)))
    torch.mul(_box(F.pad(known, (1, 1, 1, 1)), g.t, g.s), g.u12, out=_inner(r))  # b
    v, z = torch.zeros_like(r), torch.zeros_like(r)
    q, scratch = torch.empty_like(r), torch.empty_like(r)

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.mul(a, b, out=scratch).flatten(2).sum(2)

    _cycle(grids, r, z)
    if g.chol is not None:  # a grid of at most COARSEST cells a side: z is the solution
        return _inner(z)
    p = z.clone()
    rz = dot(r, z)
    done = torch.zeros_like(rz, dtype=torch.bool)
    best = torch.full_like(rz, float("inf"))
    stale = torch.zeros_like(rz, dtype=torch.long)
    for _ in range(max_iter):
        g.apply(p, q)
        alpha = torch.where(done, 0.0, rz / dot(p, q).clamp(min=1e-30))
        v.addcmul_(alpha[..., None, None], p)
        change = alpha.abs() * torch.maximum(p.flatten(2).amax(2), -p.flatten(2).amin(2))
        better = change < 0.9 * best
        best = torch.where(better, change, best)
        stale = torch.where(better, 0, stale + 1)
        done = done | (change <= tolerance) | (stale >= 5)
        if bool(done.all()):
            break
        r.addcmul_(alpha[..., None, None], q, value=-1)
        rz_old = dot(r, z)
        _cycle(grids, r, z)
        rz_new = dot(r, z)
        beta = ((rz_new - rz_old) / rz.clamp(min=1e-30))[..., None, None]
        rz = rz_new
        torch.addcmul(z, beta, p, out=p)
    return _inner(v)


def impute(x: Tensor, removed: Tensor, tolerance: float = 1e-3, max_iter: int = 100) -> Tensor:
    """Linear imputation of ``removed`` pixels, without noise, batched.

    Args:
        x: ``(B, C, H, W)`` images.
        removed: ``(B, 1, H, W)`` bool, the pixels to fill (the same for every channel). Each
            image needs at least one kept pixel (one without any is filled with zeros).
        tolerance: the solver stops once an iteration changes no filled value by more than
            this, in the units of ``x`` (the remaining error is a few times smaller).
        max_iter: solver iterations at most.

    Returns:
        ``(B, C, H, W)``: ``x`` with each removed pixel the weighted mean of its neighbours.
    """
    b, c, h, w = x.shape
    out = x.clone()
    # on a CPU, a few images at a time: the solver's vectors then stay in the cache
    step = max(1, CPU_CHUNK // (c * h * w)) if x.device.type == "cpu" else b
    for start in range(0, b, step):
        part = slice(start, start + step)
        _impute_into(out[part], removed[part], tolerance, max_iter)
    return out


def _impute_into(x: Tensor, removed: Tensor, tolerance: float, max_iter: int) -> None:
    """:func:`impute` of a chunk, in place."""
    h, w = x.shape[-2:]
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    rows = removed.any(dim=3).any(dim=0).flatten().nonzero().flatten().tolist()
    cols = removed.any(dim=2).any(dim=0).flatten().nonzero().flatten().tolist()
    if not rows:
        return
    # the solve is restricted to the removed pixels' bounding box with its one-pixel border of
    # known ones, widened to whole cells of the coarsest grid so that every grid of the
    # hierarchy is a block of the whole image's one: an image's result does not depend on the
    # other masks of the chunk (up to round-off)
    depth = _depth(h, w)
    cell = 2**depth
    y0, x0 = max(rows[0] - 1, 0) // cell * cell, max(cols[0] - 1, 0) // cell * cell
    y1 = min(-(-(rows[-1] + 2) // cell) * cell, h)
    x1 = min(-(-(cols[-1] + 2) // cell) * cell, w)
    img = x[..., y0:y1, x0:x1].to(dtype)
    u = removed[..., y0:y1, x0:x1]
    filled = _solve(img, u.to(dtype), depth, tolerance, max_iter)
    x[..., y0:y1, x0:x1] = torch.where(u, filled, img).to(x.dtype)


class _Road(plugin.Metric):
    orders: tuple[str, ...] = ()
    citation = (
        "Rong et al. 2022, A Consistent and Efficient Evaluation Strategy for Attribution "
        "Methods (ICML)"
    )
    options = {
        "percentiles": (10, 20, 30, 40, 50, 60, 70, 80, 90),
        "noise": 0.01,
        "tolerance": 1e-3,
        "max_iter": 100,
    }

    def check_options(self, options: Mapping[str, Any]) -> None:
        pct = options["percentiles"]
        ok = isinstance(pct, Sequence) and len(pct) > 0
        ok = ok and all(not isinstance(p, bool) and isinstance(p, (int, float)) for p in pct)
        if not ok or not all(0 < p < 100 for p in pct):
            raise camkit.OptionError(
                "option 'percentiles' expects a non-empty list of numbers in (0, 100); got "
                f"{pct!r}."
            )
        plugin.check_number(options, "noise", minimum=0)
        plugin.check_number(options, "tolerance", minimum=0, exclusive=True)
        plugin.check_int(options, "max_iter", minimum=1)

    def curves(self, ctx: plugin.MetricContext) -> dict[str, Tensor]:
        """``order -> (N, len(percentiles))`` scores of the filled images."""
        x = ctx.inputs[0]
        if x.ndim != 4:
            raise camkit.InputError(f"ROAD expects images (N, C, H, W); got {tuple(x.shape)}.")
        n, pixels = x.shape[0], ctx.maps[0].numel()
        order = ctx.maps.reshape(n, -1).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(pixels, device=x.device).expand(n, -1))
        counts = torch.tensor(
            [round(p / 100 * pixels) for p in ctx.options["percentiles"]], device=x.device
        )
        k = len(counts)
        morf = torch.tensor([o == "morf" for o in self.orders], device=x.device)
        # one noise image per order and percentile, the same for every sample: a sample's value
        # does not depend on the batch it is in
        shape = (len(self.orders) * k, *x.shape[1:])
        noise = torch.randn(shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
        # rows: order, percentile, sample; a chunk's masks then mostly share their order and
        # percentile, so their bounding box (the solver's domain) is as small as it can be
        rows = len(self.orders) * k * n
        size, out = ctx.options["batch_size"], []
        with plugin.progress_bar(rows, self.name, ctx.options) as bar:
            for start in range(0, rows, size):
                row = torch.arange(start, min(start + size, rows), device=x.device)
                slot, sample = row // n, row % n  # slot: the row's order and percentile
                pct, is_morf = slot % k, morf[slot // k][:, None]
                r, c = rank[sample], counts[pct][:, None]
                removed = torch.where(is_morf, r < c, r >= pixels - c)
                removed = removed.reshape(-1, 1, *x.shape[2:])
                filled = impute(
                    x[sample], removed, ctx.options["tolerance"], ctx.options["max_iter"]
                )
                filled = torch.where(removed, filled + ctx.options["noise"] * noise[slot], filled)
                inputs = (filled, *(t[sample] for t in ctx.inputs[1:]))
                out.append(ctx.score(inputs, sample))
                bar.update(len(row))
        scores = torch.cat(out).reshape(len(self.orders), k, n).transpose(1, 2)
        return dict(zip(self.orders, scores, strict=True))


class RoadMorf(_Road):
    """Mean probability over the percentiles with the most relevant pixels removed and filled;
    lower is better."""

    name = "road-morf"
    higher_is_better = False
    orders = ("morf",)
    cost = "one forward and one batched imputation per percentile (9 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        return self.curves(ctx)["morf"].mean(dim=1)


class RoadLerf(_Road):
    """Mean probability over the percentiles with the least relevant pixels removed and filled;
    higher is better."""

    name = "road-lerf"
    higher_is_better = True
    orders = ("lerf",)
    cost = "one forward and one batched imputation per percentile (9 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        return self.curves(ctx)["lerf"].mean(dim=1)


class Road(_Road):
    """Mean over the percentiles of ``(LeRF - MoRF) / 2``; higher is better."""

    name = "road"
    aliases = ("road-combined",)
    higher_is_better = True
    orders = ("morf", "lerf")
    cost = "two forwards and two batched imputations per percentile (18 by default)"

    def compute(self, ctx: plugin.MetricContext) -> Tensor:
        c = self.curves(ctx)
        return ((c["lerf"] - c["morf"]) / 2).mean(dim=1)


@camkit.hookimpl
def register_metrics(register: plugin.RegisterMetric) -> None:
    for metric in (Road(), RoadMorf(), RoadLerf()):
        register(metric)
