"""Where delta meets dense, and the filter that holds back the smallest changes.

- `ToDelta`: a dense tensor entering delta operators; its change is measured against the value
  last propagated, so a slow drift eventually crosses the threshold instead of being lost.
- `Filter`: on each delta operator's output; what it holds back stays pending and is added to
  the next frame's change, for the same reason.
- `ToDense`: a delta tensor leaving for dense operators or the model's outputs.

For filtering percentage p, a tile passes when its largest absolute change held back so far
(its magnitude) exceeds a threshold; p = 0 passes every non-zero change. The threshold is, once
calibrated (`threshold_at`, set from `deluceva.runtime.thresholds`), the p-quantile of the
tensor's tile change magnitudes on calibration frames, fixed while the video plays; before
that, the p-quantile of the magnitudes of this frame's non-zero changes at that point.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from deluceva.operators import Delta, Grid
from deluceva.operators._common import TiledBuffer
from deluceva.runtime.kernels import (
    accumulate_tiles,
    emit_tiles,
    lower_quantile,
    nonzero_tiles,
    take_changed_tiles,
    take_kept_tiles,
    tile_change_magnitudes,
)

__all__ = ["ToDelta", "Filter", "ToDense", "threshold_for"]


def tile_magnitudes(values: np.ndarray) -> np.ndarray:
    """Largest absolute value per tile: (n, C, t, t) -> (n,)."""
    if len(values) == 0:
        return np.zeros(0, values.dtype)
    return np.abs(values.reshape(len(values), -1)).max(axis=1)


def threshold_for(magnitudes: np.ndarray, percentage: float) -> float:
    """The p-quantile of the non-zero magnitudes (0 when p = 0 or nothing changed)."""
    if percentage <= 0:
        return 0.0
    candidates = magnitudes[magnitudes > 0]
    if len(candidates) == 0:
        return 0.0
    # The lower p-quantile by selection: O(n), and about 20x cheaper than np.quantile's
    # interpolating path on the few hundred tiles a typical layer has.
    rank = int(percentage * (len(candidates) - 1))
    return float(np.partition(candidates, rank)[rank])



class ToDelta:
    """Turns each frame's dense value of a tensor into its (filtered) change."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.last: np.ndarray | None = None  # (C, H, W): what downstream has seen
        self.previous: np.ndarray | None = None  # (C, H, W): last frame's value, once p > 0
        self.threshold_at: Callable[[float], float] | None = None  # calibrated: p -> threshold

    def reset(self, value: np.ndarray) -> None:
        g = self.grid
        self.last = np.array(value, np.float32).reshape(g.channels, g.height, g.width)
        self.previous = None

    def __call__(self, value: np.ndarray, percentage: float) -> Delta:
        g = self.grid
        value = np.ascontiguousarray(value, np.float32).reshape(g.channels, g.height, g.width)
        magnitudes = np.zeros((g.tiles_h, g.tiles_w), np.float32)
        tile_change_magnitudes(value, self.last, g.tile, magnitudes)
        threshold = 0.0
        if percentage > 0 and self.threshold_at is not None:
            threshold = self.threshold_at(percentage)
        elif percentage > 0:
            # Uncalibrated, the threshold comes from this frame's own change, not from everything held back:
            # held-back tiles pile up on a noisy video, and a quantile over them would pass a
            # share of the pile every frame, so the work would grow with time.
            if self.previous is None:  # then measured against `last`, as `magnitudes` just was
                fresh = magnitudes
            else:
                fresh = np.zeros((g.tiles_h, g.tiles_w), np.float32)
                tile_change_magnitudes(value, self.previous, g.tile, fresh)
            threshold = threshold_for(fresh.ravel(), percentage)
            if self.previous is None:
                self.previous = value.copy()
            else:
                np.copyto(self.previous, value)  # not a new buffer every frame
        passed = np.flatnonzero(magnitudes.ravel() > threshold)
        values = np.zeros((len(passed), g.channels, g.tile, g.tile), np.float32)
        take_changed_tiles(value, self.last, passed, g.tile, g.tiles_w, values)
        return Delta(self.grid, passed, values)


class Filter:
    """Holds back a delta operator's smallest output changes, accumulating them until they pass.

    Held-back changes wait in `pending`, with their tile magnitudes in `magnitude`, so each
    frame costs the tiles that changed or pass, not every tile that is pending.
    """

    def __init__(self, grid: Grid):
        self.grid = grid
        self.pending: np.ndarray | None = None  # allocated the first time p > 0
        self.magnitude: np.ndarray | None = None
        self.threshold_at: Callable[[float], float] | None = None  # calibrated: p -> threshold

    def reset(self) -> None:
        self.pending = None
        self.magnitude = None

    def __call__(self, delta: Delta, percentage: float) -> Delta:
        values = delta.values
        if not (
            percentage <= 1  # beyond, the quantile's rank can leave the candidates: numpy raises
            and values.dtype == np.float32
            and values.ndim == 4
            and values.shape[1:] == (self.grid.channels, self.grid.tile, self.grid.tile)
            and delta.index.dtype == np.int64
            and delta.index.shape == (len(values),)
        ):
            return self._call_numpy(delta, percentage)
        values = np.ascontiguousarray(values)
        index = np.ascontiguousarray(delta.index)
        if self.pending is None:
            if percentage <= 0:
                keep = np.empty(len(values), np.bool_)
                kept = nonzero_tiles(values, keep)
                if kept == len(keep):
                    return delta
                return Delta(self.grid, *take_kept_tiles(index, values, keep, kept))
            g = self.grid
            self.pending = np.zeros((g.n_tiles, g.channels, g.tile, g.tile), np.float32)
            self.magnitude = np.zeros(g.n_tiles, np.float32)
        candidates = np.empty(len(values), np.float32)
        count = accumulate_tiles(index, values, self.pending, self.magnitude, candidates)
        if count < 0:  # not strictly ascending within the grid: numpy's meaning of such an index
            return self._call_numpy(delta, percentage)
        # Calibrated, the threshold is fixed; otherwise it comes from this frame's own change
        # (see ToDelta for why), as in `threshold_for`: the lower p-quantile of its non-zero
        # tile magnitudes, by selection. Either way it is a float32 value (or 0), so the
        # kernel's float64 comparison is numpy's float32 one.
        threshold = 0.0
        if percentage > 0 and self.threshold_at is not None:
            threshold = self.threshold_at(percentage)
        elif percentage > 0 and count:
            threshold = lower_quantile(candidates[:count], int(percentage * (count - 1)))
        return Delta(self.grid, *emit_tiles(self.pending, self.magnitude, threshold))

    def _call_numpy(self, delta: Delta, percentage: float) -> Delta:
        """The same filter in numpy, for what the kernels do not take (and as their reference)."""
        if self.pending is None:
            if percentage <= 0:
                keep = tile_magnitudes(delta.values) > 0
                if keep.all():
                    return delta
                return Delta(self.grid, delta.index[keep], delta.values[keep])
            g = self.grid
            self.pending = np.zeros((g.n_tiles, g.channels, g.tile, g.tile), np.float32)
            self.magnitude = np.zeros(g.n_tiles, np.float32)
        if percentage > 0 and self.threshold_at is not None:
            threshold = self.threshold_at(percentage)
        else:
            threshold = threshold_for(tile_magnitudes(delta.values), percentage)
        if len(delta.index):
            updated = self.pending[delta.index] + delta.values
            self.pending[delta.index] = updated
            self.magnitude[delta.index] = tile_magnitudes(updated)
        emitted = np.flatnonzero(self.magnitude > threshold)
        values = self.pending[emitted]
        self.pending[emitted] = 0
        self.magnitude[emitted] = 0
        return Delta(self.grid, emitted, values)


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
