"""Compiled (numba) kernels for moving tiles in and out of the fused Conv's buffers.

numpy does each of these with fancy indexing on strided views, which costs a temporary per
call and, for the scatter-add, a gather and a scatter; profiling a YOLOX delta frame put
`TiledBuffer.add` alone at a fifth of the frame. Each kernel here is one pass over the tiles
that changed.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["scatter_add_tiles", "gather_patches", "gather_patches_in_row", "exchange_tiles", "dilate_tiles"]


@numba.njit(cache=True, nogil=True)
def scatter_add_tiles(data, top, left, tile, tiles_w, index, values) -> None:
    """data[c, top + ty*t + i, left + tx*t + j] += values[n, c, i, j] for tile index[n] = (ty, tx)."""
    channels = data.shape[0]
    for n in range(index.shape[0]):
        y0 = top + (index[n] // tiles_w) * tile
        x0 = left + (index[n] % tiles_w) * tile
        for c in range(channels):
            for i in range(tile):
                for j in range(tile):
                    data[c, y0 + i, x0 + j] += values[n, c, i, j]


@numba.njit(cache=True, nogil=True)
def gather_patches(data, row_step, col_step, index, tiles_w, out) -> None:
    """out[n] = the (C, ph, pw) patch of `data` at (row_step * ty, col_step * tx) of tile index[n]."""
    channels, ph, pw = out.shape[1], out.shape[2], out.shape[3]
    for n in range(index.shape[0]):
        y0 = (index[n] // tiles_w) * row_step
        x0 = (index[n] % tiles_w) * col_step
        for c in range(channels):
            for i in range(ph):
                for j in range(pw):
                    out[n, c, i, j] = data[c, y0 + i, x0 + j]


@numba.njit(cache=True, nogil=True)
def gather_patches_in_row(data, row_step, col_step, index, tiles_w, ph, pw, out) -> None:
    """The same patches side by side in one image: out[c, i, n * pw + j], out is (C, ph, N * pw).

    `gather_patches` could write this layout through a transposed view, but measured 20-75%
    slower on YOLOX's deep layers (strided writes), hence a kernel of its own.
    """
    channels = out.shape[0]
    for n in range(index.shape[0]):
        y0 = (index[n] // tiles_w) * row_step
        x0 = (index[n] % tiles_w) * col_step
        for c in range(channels):
            for i in range(ph):
                for j in range(pw):
                    out[c, i, n * pw + j] = data[c, y0 + i, x0 + j]


@numba.njit(cache=True, nogil=True)
def exchange_tiles(cache, index, new, out) -> None:
    """out[n] = new[n] - cache[index[n]], then cache[index[n]] = new[n]; `new` may be any view."""
    channels, tile = cache.shape[1], cache.shape[2]
    for n in range(index.shape[0]):
        k = index[n]
        for c in range(channels):
            for i in range(tile):
                for j in range(tile):
                    value = new[n, c, i, j]
                    out[n, c, i, j] = value - cache[k, c, i, j]
                    cache[k, c, i, j] = value


@numba.njit(cache=True, nogil=True)
def dilate_tiles(index, in_tiles_w, row_lo, row_hi, col_lo, col_hi, mask) -> np.ndarray:
    """Flat indices, ascending, of the output tiles whose window reads a changed input tile.

    Input row r reaches output rows row_lo[r]..row_hi[r] (and likewise for columns); `mask`
    is a zeroed (out_tiles_h, out_tiles_w) scratch, left zeroed again on return.
    """
    for n in range(index.shape[0]):
        r = index[n] // in_tiles_w
        c = index[n] % in_tiles_w
        for y in range(row_lo[r], row_hi[r] + 1):
            for x in range(col_lo[c], col_hi[c] + 1):
                mask[y, x] = 1
    flat = mask.ravel()
    count = 0
    for k in range(flat.shape[0]):
        if flat[k]:
            count += 1
    result = np.empty(count, np.int64)
    count = 0
    for k in range(flat.shape[0]):
        if flat[k]:
            result[count] = k
            count += 1
            flat[k] = 0
    return result
