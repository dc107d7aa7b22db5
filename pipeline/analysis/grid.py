"""The regions of a model's grid that the aggregates, the verdicts and the report name: one home,
importable with numpy alone (the report reads it without the aggregation's Dask)."""

from __future__ import annotations

import numpy as np


def region_masks(grid: tuple[int, int]) -> dict[str, np.ndarray]:
    """Flat cell masks of the regions the finding summary reports: the border ring (24 cells of a
    7x7 grid, 60 of a 16x16), its four corners, and the inner cells."""
    h, w = grid
    i, j = np.divmod(np.arange(h * w), w)
    ring = (i == 0) | (i == h - 1) | (j == 0) | (j == w - 1)
    corners = ((i == 0) | (i == h - 1)) & ((j == 0) | (j == w - 1))
    return {"ring": ring, "corners": corners, "inner": ~ring}


def square_grid(n_cells: int) -> tuple[int, int]:
    g = int(round(n_cells**0.5))
    return g, g
