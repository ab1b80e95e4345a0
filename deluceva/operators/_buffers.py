"""Buffers that operators and executors share: working buffers, and state between keyframes.

- Scratch: each kernel gets its working buffers (the marks and lists of affected positions, the
  gathered windows, the epilogue's registers) as arrays bound once, when its operator is built.
  Operators of one executor run one at a time, so they can all be given views of the same
  buffers: on YOLOX-nano one mark array and one position list for 140 steps instead of 140 of
  each (48 MB), and what one step wrote is still in cache for the next (measured: the delta
  steps of the compiled p = 0.8 plan took 3.7 ms instead of 4.7). The kernels' contract: they
  overwrite scratch before reading it, except the marks, which they find all zero and leave so.
- State: the plans of one run never run at the same time, and switching plans always runs a
  keyframe, which reloads every tensor. So their sessions can keep each tensor's seen value, its
  list of changed positions and its dense mirror in one array per tensor, not one per plan, and
  share one onnxruntime session for keyframes and one for reference frames (`shared`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Buffers"]


class Buffers:
    """A pool of shared arrays (see the module docstring).

    Example:
        >>> buffers = Buffers()
        >>> marks = buffers.scratch("mark", (100,), np.uint8)
        >>> buffers.scratch("mark", (40,), np.uint8).base is marks.base
        True
        >>> buffers.state("x", (4, 3), np.float32) is buffers.state("x", (4, 3), np.float32)
        True
    """

    def __init__(self):
        self._scratch: dict[tuple[str, str], np.ndarray] = {}
        self._state: dict[tuple, np.ndarray] = {}

    def scratch(self, purpose: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A view of at least `shape` of the working buffer for `purpose`.

        A request larger than the buffer so far replaces it with a larger one (views already given
        keep the old one alive): sizes usually come largest first, as the high-resolution layers
        come first in a network.
        """
        dtype = np.dtype(dtype)
        size = max(1, math.prod(shape))
        key = (purpose, dtype.str)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < size:
            buffer = self._scratch[key] = np.zeros(size, dtype)
        return buffer[:size].reshape(shape)

    def state(self, name, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The one zero-initialised array kept under `name` with this shape and type."""
        key = (name, tuple(shape), np.dtype(dtype).str)
        if key not in self._state:
            self._state[key] = np.zeros(shape, dtype)
        return self._state[key]

    def shared(self, name, make):
        """The one object kept under `name`, made by `make()` the first time."""
        key = ("object", name)
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    @property
    def nbytes(self) -> int:
        arrays = [b for b in [*self._scratch.values(), *self._state.values()] if isinstance(b, np.ndarray)]
        return sum(b.nbytes for b in arrays)
