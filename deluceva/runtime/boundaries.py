"""Where delta meets dense, and the filter that holds back the smallest changes.

- `ToDelta`: a dense tensor entering delta operators; its change is measured against the value
  last propagated, so a slow drift eventually crosses the threshold instead of being lost.
- `Filter`: on each delta operator's output; what it holds back stays pending and is added to
  the next frame's change, for the same reason.
- `ToDense`: a delta tensor leaving for dense operators or the model's outputs.

For filtering percentage p, a tile passes when its largest absolute change exceeds the
p-quantile of the changed tiles' magnitudes at that point; p = 0 passes every non-zero change.
"""

from __future__ import annotations

import numpy as np

from deluceva.operators import Delta, Grid
from deluceva.operators._common import TiledBuffer

__all__ = ["ToDelta", "Filter", "ToDense", "select_tiles"]


def tile_magnitudes(values: np.ndarray) -> np.ndarray:
    """Largest absolute value per tile: (n, C, t, t) -> (n,)."""
    if len(values) == 0:
        return np.zeros(0, values.dtype)
    return np.abs(values.reshape(len(values), -1)).max(axis=1)


def select_tiles(magnitudes: np.ndarray, percentage: float) -> np.ndarray:
    """Boolean mask of the tiles that pass the filter at `percentage`."""
    changed = magnitudes > 0
    if percentage <= 0 or not changed.any():
        return changed
    threshold = np.quantile(magnitudes[changed], percentage)
    return magnitudes > threshold


class ToDelta:
    """Turns each frame's dense value of a tensor into its (filtered) change."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.last: np.ndarray | None = None  # tiled, what downstream has seen

    def reset(self, value: np.ndarray) -> None:
        self.last = self.grid.tile_dense(value)

    def __call__(self, value: np.ndarray, percentage: float) -> Delta:
        tiles = self.grid.tile_dense(value)
        change = tiles - self.last
        passed = np.flatnonzero(select_tiles(tile_magnitudes(change), percentage))
        self.last[passed] = tiles[passed]
        return Delta(self.grid, passed, change[passed])


class Filter:
    """Holds back a delta operator's smallest output changes, accumulating them until they pass."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.pending: np.ndarray | None = None  # allocated the first time p > 0
        self.has_pending: np.ndarray | None = None

    def reset(self) -> None:
        self.pending = None
        self.has_pending = None

    def __call__(self, delta: Delta, percentage: float) -> Delta:
        if self.pending is None:
            if percentage <= 0:
                keep = tile_magnitudes(delta.values) > 0
                if keep.all():
                    return delta
                return Delta(self.grid, delta.index[keep], delta.values[keep])
            g = self.grid
            self.pending = np.zeros((g.n_tiles, g.channels, g.tile, g.tile), np.float32)
            self.has_pending = np.zeros(g.n_tiles, bool)
        self.pending[delta.index] += delta.values
        self.has_pending[delta.index] = True
        index = np.flatnonzero(self.has_pending)
        values = self.pending[index]
        magnitudes = tile_magnitudes(values)
        passed = select_tiles(magnitudes, percentage)
        emitted = index[passed]
        self.pending[emitted] = 0
        self.has_pending[emitted] = False
        self.has_pending[index[magnitudes == 0]] = False
        return Delta(self.grid, emitted, values[passed])


class ToDense:
    """Keeps a delta tensor's full value so dense consumers can read it."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.buffer = TiledBuffer(grid)

    def reset(self, value: np.ndarray) -> None:
        self.buffer.load(value)

    def apply(self, delta: Delta) -> None:
        if len(delta.index):
            self.buffer.add(delta.index, delta.values)

    def value(self) -> np.ndarray:
        return self.buffer.dense()
