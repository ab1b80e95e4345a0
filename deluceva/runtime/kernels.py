"""Compiled (numba) kernels for the per-frame work that touches every pixel of a dense tensor.

Turning a dense frame into its change is the one step whose cost grows with the whole image
rather than with what changed; numpy needs four passes for it (tile copy, subtract, abs, max),
these kernels need one pass to measure and one pass over the changed tiles to take them.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["tile_change_magnitudes", "take_changed_tiles"]


@numba.njit(cache=True, nogil=True)
def tile_change_magnitudes(x: np.ndarray, last: np.ndarray, tile: int, out: np.ndarray) -> None:
    """out[ty, tx] = max |x - last| over the tile; x and last are (C, H, W), out is zeroed."""
    channels, height, width = x.shape
    tiles_w = out.shape[1]
    for c in range(channels):
        for y in range(height):
            ty = y // tile
            for tx in range(tiles_w):
                biggest = out[ty, tx]
                for col in range(tx * tile, min(width, tx * tile + tile)):
                    change = abs(x[c, y, col] - last[c, y, col])
                    if change > biggest:
                        biggest = change
                out[ty, tx] = biggest


@numba.njit(cache=True, nogil=True)
def take_changed_tiles(x: np.ndarray, last: np.ndarray, index: np.ndarray, tile: int, tiles_w: int, out: np.ndarray) -> None:
    """out[i] = (x - last) on tile index[i], and last takes x there; out is zeroed (n, C, t, t)."""
    channels, height, width = x.shape
    for i in range(index.shape[0]):
        y0 = (index[i] // tiles_w) * tile
        x0 = (index[i] % tiles_w) * tile
        for c in range(channels):
            for dy in range(min(tile, height - y0)):
                for dx in range(min(tile, width - x0)):
                    value = x[c, y0 + dy, x0 + dx]
                    out[i, c, dy, dx] = value - last[c, y0 + dy, x0 + dx]
                    last[c, y0 + dy, x0 + dx] = value
