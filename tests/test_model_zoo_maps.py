"""The map follows the part of the input that drives the score, on random-config timm and
transformers models (the cases of ``scripts/sweep_models.py``).

The score of each model is read at one cell ``r`` of the layer the adapters choose: a wrapper
runs the model and returns ``||A(r)||^2 / 2``, with ``A(r)`` the layer's channel vector at that
cell, picked here from the layer's own output by this test's own knowledge of the layout (the
class and register tokens first, then the patches row by row; Swin in timm channels last).

Grad-CAM then has a map fixed by hand (Selvaraju et al. 2017, Eq. 1-2): the gradient is
``A(r)`` at ``r`` and zero elsewhere, so the weights are ``A(r) / P`` and the map at ``p`` is
``ReLU(<A(r), A(p)>) / P``. At these layers, LayerNorm outputs with unit scale and zero shift
(the initialisation), every position's vector has nearly the same norm (asserted: within 1 %),
so by Cauchy-Schwarz the map peaks at ``r`` and nowhere else unless another position holds
the same vector. Why the test cannot pass by chance: if camkit laid the positions out wrongly
(grid transposed or flipped, a wrong count of leading tokens dropped, channels first for
last), the map would peak where ``r``'s value is shown, not at ``r``; the two placements of
``r``, (0, 2) and (3, 1), are off the diagonal and mirror-free, so each such error moves at
least one of them off its cell. The score reading ``r`` moves, and the map must move with it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers import load_script
from torch import Tensor, nn

import camkit

sweep = load_script("sweep_models")

GRID = 4  # every case below lays its layer on a 4 x 4 grid
CELLS = [(0, 2), (3, 1)]


def _tokens(leading: int) -> Callable[[Tensor, tuple[int, int]], Tensor]:
    """Cell ``(i, j)`` of tokens ``(N, T, C)``: the leading tokens, then patches row by row."""

    def cell(out: Tensor, ij: tuple[int, int]) -> Tensor:
        return out[:, leading + ij[0] * GRID + ij[1], :]

    return cell


def _channels_last(out: Tensor, ij: tuple[int, int]) -> Tensor:
    return out[:, ij[0], ij[1], :]


#: case, the layer the adapters choose, how to read one cell of its output
FAMILIES: dict[str, tuple[str, Callable[[Tensor, tuple[int, int]], Tensor]]] = {
    "timm-vit": ("blocks.1.norm1", _tokens(1)),  # class token
    "timm-dinov2-registers": ("blocks.1.norm1", _tokens(5)),  # class token, 4 registers
    "timm-swin": ("norm", _channels_last),  # (N, H, W, C)
    "hf-vit": ("vit.layers.1.layernorm_before", _tokens(1)),
    "hf-swin": ("swin.layernorm", _tokens(0)),  # (N, L, C), no class token
}


class CellScore(nn.Module):
    """The model, scored by ``||A(r)||^2 / 2`` at cell ``r`` of ``layer``'s output: ``(N, 1)``."""

    def __init__(self, model: nn.Module, layer: str, cell: Callable[..., Tensor]) -> None:
        super().__init__()
        self.model, self.layer, self.cell = model, layer, cell
        self.at: tuple[int, int] = (0, 0)
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        found: list[Tensor] = []
        hook = self.model.get_submodule(self.layer).register_forward_hook(
            lambda m, args, out: found.append(out)
        )
        try:
            self.model(x)
        finally:
            hook.remove()
        self.seen.append(found[0].detach())
        a = self.cell(found[0], self.at)  # (N, C)
        return 0.5 * a.pow(2).sum(1, keepdim=True)


@pytest.mark.parametrize("key", list(FAMILIES))
def test_the_map_peaks_at_the_cell_the_score_reads_and_moves_with_it(key: str) -> None:
    case = sweep.BY_KEY[key]
    pytest.importorskip(case.library)
    layer, cell = FAMILIES[key]
    model = sweep.build(case)
    registry = camkit.registry.default_registry()
    assert registry.default_layers(model) == [layer]  # the layer the adapters choose
    x = sweep.batch(case)
    wrapper = CellScore(model, layer, cell).eval()
    size = case.size
    block = size // GRID  # input pixels per cell
    peaks = []
    for at in CELLS:
        wrapper.at, wrapper.seen = at, []
        res = camkit.explain(wrapper, x, layer=f"model.{layer}", target=0)
        out = wrapper.seen[0].double()  # the layer's output in the explained forward
        # every position (the leading tokens aside) holds a vector of nearly the same norm
        positions = torch.stack(
            [cell(out, (i, j)) for i in range(GRID) for j in range(GRID)], dim=1
        )  # (N, P, C), row by row
        norms = positions.norm(dim=2)
        assert float((norms.amax(1) / norms.amin(1)).max()) < 1.01
        # the hand-derived map: ReLU(<A(r), A(p)>) / P on the grid
        r = at[0] * GRID + at[1]
        expected = torch.relu(torch.einsum("nc,npc->np", positions[:, r], positions)) / GRID**2
        torch.testing.assert_close(
            res.raw.double().flatten(1), expected, rtol=1e-4, atol=1e-6 * float(expected.max())
        )
        assert bool((expected.argmax(1) == r).all())
        # the map at the input's size peaks inside the cell's block of pixels
        for n in range(x.shape[0]):
            flat = int(res.maps[n].argmax())
            row, col = divmod(flat, size)
            assert (row // block, col // block) == at, (key, at, n, (row, col))
        peaks.append(res.maps.flatten(1).argmax(1))
    assert bool((peaks[0] != peaks[1]).all())  # the map moved with the cell
