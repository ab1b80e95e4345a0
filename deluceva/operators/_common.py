"""Shared pieces of the delta operators: tile grids, sparse deltas, tiled buffers, the registry.

A tensor of shape (1, C, H, W) is cut into a grid of tile x tile squares. A change (a `Delta`)
lists the tiles that changed, by flat index ``ty * tiles_w + tx`` in ascending order, and their
values as an array (n, C, tile, tile). Positions that a partial edge tile covers beyond H or W
("phantom" positions) always hold zero in a delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = [
    "Grid",
    "Delta",
    "OpSpec",
    "TiledBuffer",
    "DeltaOperator",
    "register",
    "get_operator",
    "delta_support",
    "registered_op_types",
    "resolve_pads",
    "affected_tiles",
    "window_ranges",
    "take_tiles",
    "UnsupportedOperator",
]

DTYPE = np.float32


@dataclass(frozen=True)
class Grid:
    """The tile grid of a (1, C, H, W) tensor."""

    channels: int
    height: int
    width: int
    tile: int

    @property
    def tiles_h(self) -> int:
        return -(-self.height // self.tile)

    @property
    def tiles_w(self) -> int:
        return -(-self.width // self.tile)

    @property
    def n_tiles(self) -> int:
        return self.tiles_h * self.tiles_w

    @property
    def has_phantom(self) -> bool:
        return self.height % self.tile != 0 or self.width % self.tile != 0

    def tile_dense(self, x: np.ndarray) -> np.ndarray:
        """(1, C, H, W) -> (n_tiles, C, t, t), zero-padded at the bottom and right edges."""
        t = self.tile
        c = self.channels
        hp, wp = self.tiles_h * t, self.tiles_w * t
        x = x.reshape(c, self.height, self.width)
        if (hp, wp) != (self.height, self.width):
            padded = np.zeros((c, hp, wp), dtype=DTYPE)
            padded[:, : self.height, : self.width] = x
            x = padded
        tiled = x.reshape(c, self.tiles_h, t, self.tiles_w, t).transpose(1, 3, 0, 2, 4)
        # Always a copy: operators keep the result as their cache and update it in place, and
        # where the tiling is trivial (one tile, or C = 1 and one tile column) a view would
        # alias the caller's array, which other operators' caches may alias too.
        return np.array(tiled, dtype=DTYPE, order="C").reshape(self.n_tiles, c, t, t)

    def untile(self, tiles: np.ndarray) -> np.ndarray:
        """(n_tiles, C, t, t) -> (1, C, H, W)."""
        t = self.tile
        x = tiles.reshape(self.tiles_h, self.tiles_w, self.channels, t, t).transpose(2, 0, 3, 1, 4)
        x = x.reshape(self.channels, self.tiles_h * t, self.tiles_w * t)
        return np.ascontiguousarray(x[None, :, : self.height, : self.width])

    def phantom_mask(self) -> np.ndarray:
        """(n_tiles, 1, t, t) bool: True where a tile position lies inside the tensor."""
        t = self.tile
        rows = np.arange(self.tiles_h * t) < self.height
        cols = np.arange(self.tiles_w * t) < self.width
        inside = rows[:, None] & cols[None, :]
        inside = inside.reshape(self.tiles_h, t, self.tiles_w, t).transpose(0, 2, 1, 3)
        return inside.reshape(self.n_tiles, 1, t, t)

    def zero_phantom(self, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Zero, in place, the positions of `values` that lie outside the tensor.

        Only edge tiles can hold such positions, so only they are touched.
        """
        if not self.has_phantom or len(index) == 0:
            return values
        cached = _phantom_cache.get(self)
        if cached is None:
            mask = self.phantom_mask()
            cached = _phantom_cache.setdefault(self, (mask, ~mask.all(axis=(1, 2, 3))))
        mask, edge = cached
        at = np.flatnonzero(edge[index])
        if len(at):
            values[at] = np.where(mask[index[at]], values[at], DTYPE(0))
        return values


_phantom_cache: dict[Grid, tuple[np.ndarray, np.ndarray]] = {}


@dataclass
class Delta:
    """The change of one tensor: the changed tiles' flat indices and their values."""

    grid: Grid
    index: np.ndarray  # (n,) int64, ascending
    values: np.ndarray  # (n, C, t, t) float32

    @classmethod
    def empty(cls, grid: Grid) -> "Delta":
        t = grid.tile
        return cls(grid, np.zeros(0, np.int64), np.zeros((0, grid.channels, t, t), DTYPE))

    @property
    def density(self) -> float:
        """Share of the grid's tiles that carry a change."""
        return len(self.index) / self.grid.n_tiles

    def mask(self) -> np.ndarray:
        """(tiles_h, tiles_w) bool: which tiles changed."""
        m = np.zeros(self.grid.n_tiles, bool)
        m[self.index] = True
        return m.reshape(self.grid.tiles_h, self.grid.tiles_w)

    def to_dense(self) -> np.ndarray:
        """The change as a dense (1, C, H, W) array."""
        full = np.zeros((self.grid.n_tiles, self.grid.channels, self.grid.tile, self.grid.tile), DTYPE)
        full[self.index] = self.values
        return self.grid.untile(full)


class TiledBuffer:
    """A dense (C, H, W) buffer with padding around it, seen both as an image and as tiles.

    Scattering or gathering changed tiles costs only the changed tiles; the dense image view
    costs nothing. Windowed operators read patches around tiles straight from the padded image.
    """

    def __init__(self, grid: Grid, pad: tuple[int, int, int, int] = (0, 0, 0, 0), fill: float = 0.0):
        top, left, bottom, right = pad
        t = grid.tile
        self.grid = grid
        self.top, self.left = top, left
        height = top + grid.tiles_h * t + bottom
        width = left + grid.tiles_w * t + right
        self.fill = fill
        self.data = np.full((grid.channels, height, width), fill, DTYPE)
        interior = self.data[:, top:, left:]
        cs, rs, es = interior.strides
        self.tiles = as_strided(
            interior, (grid.tiles_h, grid.tiles_w, grid.channels, t, t), (t * rs, t * es, cs, rs, es)
        )

    def _yx(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.divmod(index, self.grid.tiles_w)

    def gather(self, index: np.ndarray) -> np.ndarray:
        ty, tx = self._yx(index)
        return self.tiles[ty, tx]

    def assign(self, index: np.ndarray, values: np.ndarray | float) -> None:
        ty, tx = self._yx(index)
        self.tiles[ty, tx] = values

    def add(self, index: np.ndarray, values: np.ndarray) -> None:
        ty, tx = self._yx(index)
        self.tiles[ty, tx] += values

    def load(self, x: np.ndarray) -> None:
        """Overwrite the interior with a dense (1, C, H, W) tensor; padding keeps its fill."""
        g = self.grid
        self.data[:, self.top : self.top + g.height, self.left : self.left + g.width] = x.reshape(
            g.channels, g.height, g.width
        )

    def dense(self) -> np.ndarray:
        """A (1, C, H, W) view of the interior."""
        g = self.grid
        return self.data[None, :, self.top : self.top + g.height, self.left : self.left + g.width]

    def windows(self, out_grid: Grid, stride: tuple[int, int], patch: tuple[int, int]) -> np.ndarray:
        """View (out_tiles_h, out_tiles_w, C, ph, pw): the input patch under each output tile.

        The patch of output tile (oy, ox) starts at buffer row oy * tile * stride_h (the buffer's
        top padding stands for the operator's own top padding), so the caller must have built
        this buffer with enough padding on every side for all the patches.
        """
        c, _, _ = self.data.shape
        cs, rs, es = self.data.strides
        t = out_grid.tile
        shape = (out_grid.tiles_h, out_grid.tiles_w, c, patch[0], patch[1])
        strides = (t * stride[0] * rs, t * stride[1] * es, cs, rs, es)
        return as_strided(self.data, shape, strides, writeable=False)


def window_ranges(out_tiles: int, out_tile: int, stride: int, pad_begin: int, patch: int, in_tile: int, in_tiles: int):
    """For each output tile along one axis, the first and last input tile its patch touches.

    Returns (lo, hi) int arrays, clipped to the grid; lo > hi where the patch lies in padding.
    """
    start = np.arange(out_tiles) * out_tile * stride - pad_begin
    end = start + patch - 1
    lo = np.clip(np.floor_divide(np.maximum(start, 0), in_tile), 0, in_tiles)
    hi = np.clip(np.floor_divide(end, in_tile), -1, in_tiles - 1)
    return lo, hi


def affected_tiles(in_mask: np.ndarray, rows: tuple[np.ndarray, np.ndarray], cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Flat indices of output tiles whose input rectangle holds a changed input tile.

    `rows` and `cols` come from `window_ranges`; an integral image answers each rectangle in O(1).
    """
    integral = np.zeros((in_mask.shape[0] + 1, in_mask.shape[1] + 1), np.int32)
    np.cumsum(np.cumsum(in_mask, axis=0, dtype=np.int32), axis=1, out=integral[1:, 1:])
    r0, r1 = rows
    c0, c1 = cols
    r0c, r1c = r0[:, None], (r1 + 1)[:, None]
    c0c, c1c = c0[None, :], (c1 + 1)[None, :]
    r1c = np.maximum(r1c, r0c)
    c1c = np.maximum(c1c, c0c)
    count = integral[r1c, c1c] - integral[r0c, c1c] - integral[r1c, c0c] + integral[r0c, c0c]
    return np.flatnonzero(count)


def take_tiles(image: np.ndarray, grid: Grid, index: np.ndarray) -> np.ndarray:
    """Tiles `index` of `grid` cut from a (C, H', W') image at least tiles_h*t by tiles_w*t large.

    Windowed operators use it when recomputing the whole padded buffer in one call is cheaper than
    gathering many overlapping patches.
    """
    t = grid.tile
    image = image[:, : grid.tiles_h * t, : grid.tiles_w * t]
    blocks = image.reshape(image.shape[0], grid.tiles_h, t, grid.tiles_w, t)
    ty, tx = np.divmod(index, grid.tiles_w)
    return blocks[:, ty, :, tx, :]


def resolve_pads(attrs: dict, in_hw: tuple[int, int], kernel: tuple[int, int], strides, dilations) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) pads from `pads` or `auto_pad`."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        return pads[0], pads[1], pads[2], pads[3]
    if auto_pad == "VALID":
        return 0, 0, 0, 0
    result = []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        result.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    (top, bottom), (left, right) = result
    return top, left, bottom, right


@dataclass
class OpSpec:
    """Everything an operator needs to know about one node, without the graph.

    `input_grids[i]` is None for a constant input (its value is in `constants[i]`) or for a
    tensor that is not a 4-D image tensor.
    """

    name: str
    op_type: str
    attrs: dict
    input_shapes: list[tuple[int, ...]]
    output_shapes: list[tuple[int, ...]]
    constants: dict[int, np.ndarray] = field(default_factory=dict)
    input_grids: list[Grid | None] = field(default_factory=list)
    output_grids: list[Grid | None] = field(default_factory=list)
    threads: int = 1
    opset: int | None = None  # the model's default-domain opset, where known


class UnsupportedOperator(ValueError):
    """Raised for an op type that has no delta variant."""


class DeltaOperator:
    """Base class of the delta variants.

    `reset` fills the operator's caches from dense values (a keyframe); `step` takes the inputs'
    changes (None for constant inputs) and returns the outputs' changes, exact up to float
    rounding. `supports` says why a node cannot run as delta, or None when it can.
    """

    op_type: ClassVar[str] = ""

    def __init__(self, spec: OpSpec):
        self.spec = spec

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        return None

    def reset(self, inputs: list[np.ndarray | None], outputs: list[np.ndarray]) -> None:
        pass

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        raise NotImplementedError


_REGISTRY: dict[str, type[DeltaOperator]] = {}


def register(*op_types: str) -> Callable[[type[DeltaOperator]], type[DeltaOperator]]:
    """Class decorator: make `cls` the delta variant of the given ONNX op types."""

    def wrap(cls: type[DeltaOperator]) -> type[DeltaOperator]:
        for op_type in op_types:
            _REGISTRY[op_type] = cls
        return cls

    return wrap


def registered_op_types() -> list[str]:
    return sorted(_REGISTRY)


def get_operator(op_type: str) -> type[DeltaOperator]:
    try:
        return _REGISTRY[op_type]
    except KeyError:
        raise UnsupportedOperator(
            f"no delta kernel for {op_type}; op types with one: {', '.join(registered_op_types())}"
        ) from None


def delta_support(spec: OpSpec) -> str | None:
    """None when `spec` can run as delta, else the reason it must run dense."""
    if spec.op_type not in _REGISTRY:
        return f"no delta kernel for {spec.op_type}"
    # An omitted optional input ("") has shape None and is neither constant nor varying.
    variable = [i for i, shape in enumerate(spec.input_shapes) if i not in spec.constants and shape is not None]
    if not variable:
        return "all inputs are constant"
    for i in variable:
        if spec.input_grids[i] is None:
            return f"input {i} is not a 1xCxHxW float tensor"
    for i, grid in enumerate(spec.output_grids):
        if grid is None:
            return f"output {i} is not a 1xCxHxW float tensor"
    return _REGISTRY[spec.op_type].supports(spec)


def tile_size_for(height: int, width: int, input_hw: tuple[int, int], base_tile: int) -> int:
    """Tile edge for a tensor: `base_tile` at the input's resolution, scaled with the tensor.

    A power of two, so tiles of layers at strides 1, 2, 4... line up.
    """
    scale = min(height / input_hw[0], width / input_hw[1])
    ideal = max(1.0, base_tile * scale)
    return int(min(base_tile, 2 ** math.floor(math.log2(ideal) + 0.5)))
