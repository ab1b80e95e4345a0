"""Where dense meets delta: a dense tensor's change, and a delta tensor's dense mirror.

- `to_delta_step`: a dense (C, H*W) value (from the video, or from an onnxruntime segment)
  against the `DeltaTensor` its delta consumers read: the positions whose largest change exceeds
  the threshold are copied in and listed. What stays under it is not lost: the seen value keeps
  the old one, so the difference grows frame after frame until it passes.
- `mirror_step`: keeps a dense (C, H*W) copy of a delta tensor up to date at its changed
  positions, for dense consumers and the model's outputs.
"""

from __future__ import annotations

import numba
import numpy as np

from deluceva.operators import DeltaTensor

__all__ = ["Entry", "to_delta_step", "mirror_step", "same_values", "exceeds", "change_magnitudes"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def to_delta_step(x, planar, value, offset, threshold, changed, count, magnitudes) -> bool:
    """Take the change of dense x (C, P) against `planar` (C, P), the seen value laid out as x
    is, into both it and value[:P, offset:offset + C]; False (and nothing listed) when x holds a
    NaN or an infinity, which the caller must not hide (it runs a keyframe instead).

    Comparing against a copy in x's own layout lets the pass over every value run along whole
    rows, vectorised (5x faster than against the channels-last value); `magnitudes` is (P,)
    float32 scratch.
    """
    channels, positions = x.shape
    limit = threshold[0]
    magnitudes[:] = 0.0
    finite = True  # an "and" over every value vectorises where a float sum would not
    for c in range(channels):
        for p in range(positions):
            v = x[c, p]
            finite &= v - v == 0
            magnitudes[p] = max(magnitudes[p], abs(v - planar[c, p]))
    if not finite:
        count[0] = 0
        return False
    n = 0
    for p in range(positions):
        if magnitudes[p] > limit:
            changed[n] = p
            n += 1
    base = np.uint64(offset)
    for j in range(n):
        p = changed[j]
        for c in range(channels):
            v = x[c, p]
            planar[c, p] = v
            value[p, base + np.uint64(c)] = v
    count[0] = n
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def mirror_step(value, offset, changed, count, mirror) -> None:
    """mirror[:, p] = value[p, offset:offset + C] at the changed positions; mirror is (C, P)."""
    channels = mirror.shape[0]
    base = np.uint64(offset)
    for j in range(count[0]):
        p = changed[j]
        for c in range(channels):
            mirror[c, p] = value[p, base + np.uint64(c)]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def same_values(a, b) -> bool:
    """Whether two float32 arrays of one shape hold the same bits (stops at the first difference,
    a few microseconds on a frame that changed; NaN equals NaN, -0 differs from 0)."""
    x = a.reshape(a.size).view(np.int32)
    y = b.reshape(b.size).view(np.int32)
    block = 4096
    for start in range(0, x.shape[0], block):
        differ = False
        for i in range(start, min(x.shape[0], start + block)):
            differ |= x[i] != y[i]
        if differ:
            return False
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def exceeds(a, b, threshold) -> bool:
    """Whether some position of (1, C, H, W) arrays a and b differs by more than `threshold` in
    some channel, or holds a NaN or an infinity; stops at the first such position (on a video
    with noise everywhere, within the first few hundred values)."""
    channels = a.shape[1]
    x = a.reshape((channels, a.size // channels))
    y = b.reshape(x.shape)
    block = 1024
    for start in range(0, x.shape[1], block):
        stop = min(x.shape[1], start + block)
        found = False
        for c in range(channels):
            for p in range(start, stop):
                v = x[c, p]
                found |= (abs(v - y[c, p]) > threshold) | (v - v != 0)
        if found:
            return True
    return False


class Entry:
    """A dense tensor entering delta steps: each frame's dense value becomes its change.

    Example:
        >>> entry = Entry(delta_tensor)           # doctest: +SKIP
        >>> entry.load(first_value)               # a keyframe
        >>> entry(next_value)                     # True; delta_tensor.changed lists the change
    """

    def __init__(self, target: DeltaTensor, buffers=None, name: str = ""):
        self.target = target
        shape = (target.layout.channels, target.layout.positions)
        if buffers is None:
            self.planar, self.magnitudes = np.zeros(shape, np.float32), np.zeros(shape[1], np.float32)
        else:  # shared with the other plans of a run (`deluceva.operators._buffers`)
            self.planar = buffers.state(("planar", name), shape, np.float32)
            self.magnitudes = buffers.scratch("magnitudes", (shape[1],), np.float32)

    def load(self, dense: np.ndarray) -> None:
        np.copyto(self.planar, np.asarray(dense, np.float32).reshape(self.planar.shape))
        self.target.load(dense)

    def __call__(self, dense: np.ndarray) -> bool:
        """Take the change of `dense`; False when it holds a NaN or an infinity (see `to_delta_step`)."""
        t = self.target
        x = np.ascontiguousarray(dense, np.float32).reshape(self.planar.shape)
        return to_delta_step(x, self.planar, t.storage, t.offset, t.threshold, t.changed, t.count, self.magnitudes)


def change_magnitudes(after: np.ndarray, before: np.ndarray) -> np.ndarray:
    """Per position, the largest absolute change over the channels: (1, C, H, W) x 2 -> (H*W,)."""
    channels = after.shape[1]
    difference = np.abs(after.reshape(channels, -1) - before.reshape(channels, -1))
    return difference.max(axis=0)
