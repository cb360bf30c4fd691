"""Per-image loop implementations of deletion/insertion and ROAD, the references of
``benchmarks/test_metrics.py``: what a metric computed image by image on the CPU costs.

Deletion/insertion: for each image, each step is one forward of one image. ROAD: for each image,
percentile and order, the paper's noisy linear imputation as one direct sparse solve (scipy,
float64, as Rong et al.'s reference code does) and one forward of one image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

#: Rong et al.'s neighbour weights.
NEIGHBOURS = [
    ((0, 1), 1 / 6), ((1, 0), 1 / 6), ((0, -1), 1 / 6), ((-1, 0), 1 / 6),
    ((1, 1), 1 / 12), ((1, -1), 1 / 12), ((-1, 1), 1 / 12), ((-1, -1), 1 / 12),
]  # fmt: skip


def _probability(model: nn.Module, x: Tensor, cls: int) -> float:
    with torch.no_grad():
        return float(torch.softmax(model(x[None]).float(), 1)[0, cls])


def deletion_loop(
    model: nn.Module, x: Tensor, maps: Tensor, classes: Tensor, steps: int, insert: bool
) -> Tensor:
    """Deletion (or insertion, ``insert``) to zeros, one image and one step at a
    time, on ``x``'s device."""
    out = []
    for i in range(x.shape[0]):
        pixels = maps[i].numel()
        order = maps[i].flatten().argsort(descending=True, stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(pixels, device=order.device)
        curve = []
        for k in range(steps + 1):
            done = (rank < round(k * pixels / steps)).reshape(1, *maps.shape[1:])
            xi = torch.where(done, x[i], 0.0) if insert else torch.where(done, 0.0, x[i])
            curve.append(_probability(model, xi, int(classes[i])))
        c = torch.tensor(curve)
        out.append(float(((c[1:] + c[:-1]) / 2).sum() / steps))
    return torch.tensor(out)


def impute_sparse(img: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The paper's linear imputation of one image ``(C, H, W)`` by a direct sparse solve."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import spsolve

    c, h, w = img.shape
    flat_removed = removed.ravel()
    idx = np.flatnonzero(flat_removed)
    n = len(idx)
    if n == 0:
        return img
    var = -np.ones(h * w, dtype=np.int64)
    var[idx] = np.arange(n)
    ys, xs = np.divmod(idx, w)
    flat = img.reshape(c, -1)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    rows, cols, vals = [np.arange(n)], [np.arange(n)], []
    for (dy, dx), wt in NEIGHBOURS:
        yy, xx = ys + dy, xs + dx
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        i = np.flatnonzero(ok)
        j = yy[ok] * w + xx[ok]
        diag[i] += wt
        unknown = flat_removed[j]
        rows.append(i[unknown])
        cols.append(var[j[unknown]])
        vals.append(np.full(int(unknown.sum()), -wt))
        rhs[i[~unknown]] += wt * flat[:, j[~unknown]].T
    matrix = csc_matrix(
        (np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
    )
    solution = np.asarray(spsolve(matrix, rhs)).reshape(n, c)
    out = flat.copy()
    out[:, idx] = solution.T
    return out.reshape(c, h, w)


def road_loop(
    model: nn.Module,
    x: Tensor,
    maps: Tensor,
    classes: Tensor,
    percentiles: Sequence[float],
    noise: float = 0.01,
) -> Tensor:
    """ROAD (``(LeRF - MoRF) / 2``, mean over percentiles), one image, percentile and order at
    a time; the imputation on the CPU, the forwards on ``x``'s device."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(x.shape[0]):
        pixels = maps[i].numel()
        order = maps[i].flatten().argsort(descending=True, stable=True).cpu()
        img = x[i].double().cpu().numpy()
        values = []
        for p in percentiles:
            k = round(p / 100 * pixels)
            probs = []
            for chosen in (order[:k], order[pixels - k :]):
                removed = np.zeros(pixels, dtype=bool)
                removed[chosen.numpy()] = True
                removed = removed.reshape(maps.shape[1:])
                filled = torch.from_numpy(impute_sparse(img, removed)).float()
                filled += noise * torch.randn(filled.shape, generator=g) * torch.from_numpy(removed)
                probs.append(_probability(model, filled.to(x.device), int(classes[i])))
            values.append((probs[1] - probs[0]) / 2)
        out.append(sum(values) / len(values))
    return torch.tensor(out)
