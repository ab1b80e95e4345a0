"""Compiled (numba) kernels for the per-frame work that touches every pixel of a dense tensor.

Turning a dense frame into its change is the one step whose cost grows with the whole image
rather than with what changed; numpy needs four passes for it (tile copy, subtract, abs, max),
these kernels need one pass to measure and one pass over the changed tiles to take them.
The filter on each delta operator's output runs once per output and frame, so its numpy
gathers, scatters and temporaries cost more than its arithmetic: its kernels do the same work
in place, each in one call.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "tile_change_magnitudes",
    "take_changed_tiles",
    "nonzero_tiles",
    "take_kept_tiles",
    "accumulate_tiles",
    "emit_tiles",
    "lower_quantile",
]


@numba.njit(cache=True, nogil=True)
def tile_change_magnitudes(x: np.ndarray, last: np.ndarray, tile: int, out: np.ndarray) -> None:
    """out[ty, tx] = max |x - last| over the tile; x and last are (C, H, W), out is zeroed.

    Exactly: out[ty, tx] keeps the largest of itself and the tile's changes, compared by `>`
    (so NaN changes are ignored), whatever order the changes are visited in.
    """
    channels, height, width = x.shape
    tiles_h, tiles_w = out.shape
    # Per tile row, the largest change in each column first: that pass runs along whole image
    # rows and vectorises, where a pass tile by tile runs along `tile` pixels at a time.
    columns = np.full((tiles_h, width), -np.inf, x.dtype)
    for c in range(channels):
        for y in range(height):
            row = columns[y // tile]
            for col in range(width):
                change = abs(x[c, y, col] - last[c, y, col])
                row[col] = change if change > row[col] else row[col]
    for ty in range(tiles_h):
        for tx in range(tiles_w):
            biggest = out[ty, tx]
            for col in range(tx * tile, min(width, tx * tile + tile)):
                if columns[ty, col] > biggest:
                    biggest = columns[ty, col]
            out[ty, tx] = biggest


@numba.njit(cache=True, nogil=True)
def take_changed_tiles(x: np.ndarray, last: np.ndarray, index: np.ndarray, tile: int, tiles_w: int, out: np.ndarray) -> None:
    """out[i] = (x - last) on tile index[i], and last takes x there; out is zeroed (n, C, t, t)."""
    channels, height, width = x.shape
    # Flat offsets: a tile row is `tile` pixels, too short for 3-D indexing's per-pixel work.
    flat_x = x.reshape(x.size)
    flat_last = last.reshape(last.size)
    for i in range(index.shape[0]):
        y0 = (index[i] // tiles_w) * tile
        x0 = (index[i] % tiles_w) * tile
        rows = min(tile, height - y0)
        cols = min(tile, width - x0)
        for c in range(channels):
            for dy in range(rows):
                start = (c * height + y0 + dy) * width + x0
                target = out[i, c, dy]
                for dx in range(cols):
                    value = flat_x[start + dx]
                    target[dx] = value - flat_last[start + dx]
                    flat_last[start + dx] = value


# The filter's kernels compare tile magnitudes through their float32 bit patterns: for values
# whose sign bit is cleared, integer order is float order with NaN above +inf, and an integer
# max vectorises where a float max that has to propagate NaN does not.
_ABS_BITS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)


@numba.njit(cache=True, nogil=True)
def _tile_bits(values: np.ndarray) -> np.ndarray:
    """(n, C, t, t) float32 -> (n, C*t*t) int32 view of the same memory."""
    n = values.shape[0]
    return values.reshape((n, values.shape[1] * values.shape[2] * values.shape[3])).view(np.int32)


@numba.njit(cache=True, nogil=True)
def nonzero_tiles(values: np.ndarray, keep: np.ndarray) -> int:
    """keep[i] = tile i's magnitude (largest |value|, NaN if any is NaN) is > 0; returns the count."""
    bits = _tile_bits(values)
    kept = 0
    for i in range(bits.shape[0]):
        biggest = np.int32(0)
        for j in range(bits.shape[1]):
            biggest = max(biggest, np.int32(bits[i, j] & _ABS_BITS))
        keep[i] = 0 < biggest <= _INF_BITS
        kept += keep[i]
    return kept


@numba.njit(cache=True, nogil=True)
def take_kept_tiles(
    index: np.ndarray, values: np.ndarray, keep: np.ndarray, kept: int
) -> tuple[np.ndarray, np.ndarray]:
    """(index[keep], values[keep]) for a keep mask holding `kept` trues."""
    out_index = np.empty(kept, index.dtype)
    out_values = np.empty((kept,) + values.shape[1:], values.dtype)
    source = values.reshape((values.shape[0], values.shape[1] * values.shape[2] * values.shape[3]))
    target = out_values.reshape((kept, source.shape[1]))
    k = 0
    for i in range(index.shape[0]):
        if keep[i]:
            out_index[k] = index[i]
            for j in range(source.shape[1]):
                target[k, j] = source[i, j]
            k += 1
    return out_index, out_values


@numba.njit(cache=True, nogil=True)
def accumulate_tiles(
    index: np.ndarray, values: np.ndarray, pending: np.ndarray, magnitude: np.ndarray, candidates: np.ndarray
) -> int:
    """Add a change into what a filter holds back, and list the change's non-zero tile magnitudes.

    pending[index] += values and magnitude[index] = the updated tiles' magnitudes; candidates[:k]
    = the magnitudes of `values`' tiles that are > 0 (neither zero nor NaN), in order; returns k.
    Returns -1 and touches nothing when index is not strictly ascending within the grid.
    """
    n_tiles = pending.shape[0]
    for i in range(index.shape[0]):
        if index[i] < 0 or index[i] >= n_tiles or (i > 0 and index[i] <= index[i - 1]):
            return -1
    incoming = _tile_bits(values)
    held = _tile_bits(pending)
    held_values = pending.reshape(held.shape)
    flat_values = values.reshape(incoming.shape)
    magnitude_bits = magnitude.view(np.int32)
    candidate_bits = candidates.view(np.int32)
    count = 0
    for i in range(index.shape[0]):
        tile = index[i]
        biggest = np.int32(0)
        for j in range(incoming.shape[1]):
            biggest = max(biggest, np.int32(incoming[i, j] & _ABS_BITS))
        if 0 < biggest <= _INF_BITS:
            candidate_bits[count] = biggest
            count += 1
        for j in range(incoming.shape[1]):
            held_values[tile, j] += flat_values[i, j]
        biggest = np.int32(0)
        for j in range(held.shape[1]):
            biggest = max(biggest, np.int32(held[tile, j] & _ABS_BITS))
        magnitude_bits[tile] = biggest
    return count


@numba.njit(cache=True, nogil=True)
def emit_tiles(pending: np.ndarray, magnitude: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Take out the held-back tiles whose magnitude exceeds threshold: (ascending indices, values).

    Their pending values and magnitudes are zeroed.
    """
    n_tiles = magnitude.shape[0]
    passing = np.empty(n_tiles, np.int64)
    count = 0
    for i in range(n_tiles):
        if magnitude[i] > threshold:
            passing[count] = i
            count += 1
    emitted = passing[:count].copy()
    values = np.empty((count,) + pending.shape[1:], pending.dtype)
    held = pending.reshape((n_tiles, pending.shape[1] * pending.shape[2] * pending.shape[3]))
    taken = values.reshape((count, held.shape[1]))
    for k in range(count):
        tile = emitted[k]
        for j in range(held.shape[1]):
            taken[k, j] = held[tile, j]
            held[tile, j] = 0
        magnitude[tile] = 0
    return emitted, values


@numba.njit(cache=True, nogil=True)
def lower_quantile(candidates: np.ndarray, rank: int) -> float:
    """The rank-th smallest of candidates (no NaN), by selection; candidates is reordered.

    What np.partition(candidates, rank)[rank] gives, by quickselect: numba's own np.partition
    takes seconds to compile.
    """
    a = candidates
    lo, hi = 0, a.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        pivot = max(min(a[lo], a[mid]), min(max(a[lo], a[mid]), a[hi]))  # median of three
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        # Now a[lo..j] <= pivot <= a[i..hi], and anything between i and j equals the pivot.
        if rank <= j:
            hi = j
        elif rank >= i:
            lo = i
        else:
            return a[rank]
    return a[rank]
