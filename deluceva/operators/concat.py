"""Delta Concat and Split on the channel axis, and Slice (channels, and strided rows/columns).

A change of a concatenation is the concatenation of the changes; a split or a channel slice takes
channels of the change. A spatial Slice scatters the change into a zero scratch image and gathers
the output tiles it can reach through the slice's strided view.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, TiledBuffer, affected_tiles, register

__all__ = ["DeltaConcat", "DeltaSplit", "DeltaSlice"]


def _channel_axis(axis: int) -> bool:
    return axis in (1, -3)


@register("Concat")
class DeltaConcat(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if not _channel_axis(int(spec.attrs.get("axis", 0))):
            return f"Concat on axis {spec.attrs.get('axis')} (only the channel axis has a delta kernel)"
        if any(g is not None and g.tile != spec.output_grids[0].tile for g in spec.input_grids):
            return "Concat inputs are tiled differently"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.grid = spec.output_grids[0]
        bounds = np.cumsum([0] + [s[1] for s in spec.input_shapes])
        # Constant inputs never change: their channels of the change stay zero.
        self.parts = [(i, bounds[i], bounds[i + 1]) for i in range(len(spec.input_shapes)) if i not in spec.constants]

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        changes = [deltas[i] for i, _, _ in self.parts]
        first = changes[0].index
        if len(self.parts) == len(self.spec.input_shapes) and all(np.array_equal(d.index, first) for d in changes):
            return [Delta(self.grid, first, np.concatenate([d.values for d in changes], axis=1))]
        index = np.unique(np.concatenate([d.index for d in changes]))
        t = self.grid.tile
        out = np.zeros((len(index), self.grid.channels, t, t), np.float32)
        for (_, lo, hi), d in zip(self.parts, changes):
            out[np.searchsorted(index, d.index), lo:hi] = d.values
        return [Delta(self.grid, index, out)]


@register("Split")
class DeltaSplit(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if not _channel_axis(int(spec.attrs.get("axis", 0))):
            return f"Split on axis {spec.attrs.get('axis', 0)} (only the channel axis has a delta kernel)"
        return None

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        out, lo = [], 0
        for grid in self.spec.output_grids:
            out.append(Delta(grid, change.index, np.ascontiguousarray(change.values[:, lo : lo + grid.channels])))
            lo += grid.channels
        return out


def _slice_params(spec: OpSpec):
    """(starts, ends, axes, steps) as lists, from attributes (opset < 10) or constant inputs."""
    if len(spec.input_shapes) == 1:
        a = spec.attrs
        starts, ends = list(a["starts"]), list(a["ends"])
        return starts, ends, list(a.get("axes", range(len(starts)))), [1] * len(starts)
    values = [spec.constants.get(i) for i in range(1, 5)]
    if any(v is None for v, s in zip(values, spec.input_shapes[1:]) if s is not None):
        return None
    starts, ends = values[0].tolist(), values[1].tolist()
    axes = values[2].tolist() if values[2] is not None else list(range(len(starts)))
    steps = values[3].tolist() if values[3] is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _positions(start: int, end: int, step: int, size: int) -> np.ndarray:
    """The indices ONNX Slice takes along one axis (its clamping rules)."""
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    if step > 0:
        return np.arange(min(max(start, 0), size), min(max(end, 0), size), step)
    return np.arange(min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)


@register("Slice")
class DeltaSlice(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        params = _slice_params(spec)
        if params is None:
            return "Slice starts, ends, axes or steps are not constant"
        if 0 in spec.output_shapes[0]:
            return "Slice output is empty"
        for _, _, axis, step in zip(*params):
            if axis % 4 == 0:
                return "Slice on the batch axis"
            if axis % 4 >= 2 and step < 0:
                return "spatial Slice with a negative step"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.in_grid, self.grid = gi, go = spec.input_grids[0], spec.output_grids[0]
        shape = (1, gi.channels, gi.height, gi.width)
        picks = [np.arange(n) for n in shape]
        for start, end, axis, step in zip(*_slice_params(spec)):
            picks[axis % 4] = _positions(int(start), int(end), int(step), shape[axis % 4])
        channels, rows, cols = picks[1:]
        self.channels = None if np.array_equal(channels, np.arange(gi.channels)) else channels
        self.spatial = not (np.array_equal(rows, np.arange(gi.height)) and np.array_equal(cols, np.arange(gi.width)))
        if not self.spatial:
            return
        # Output position (y, x) reads input (y0 + y * sy, x0 + x * sx); steps are positive.
        y0, x0 = int(rows[0]), int(cols[0])
        sy = int(rows[1] - rows[0]) if len(rows) > 1 else 1
        sx = int(cols[1] - cols[0]) if len(cols) > 1 else 1
        to, ti = go.tile, gi.tile
        need_h = y0 + (go.tiles_h * to - 1) * sy + 1
        need_w = x0 + (go.tiles_w * to - 1) * sx + 1
        self.scratch = TiledBuffer(gi, (0, 0, max(0, need_h - gi.tiles_h * ti), max(0, need_w - gi.tiles_w * ti)))
        data = self.scratch.data
        cs, rs, es = data.strides
        origin = data[:, y0:, x0:]
        self.view = as_strided(origin, (go.tiles_h, go.tiles_w, gi.channels, to, to),
                               (to * sy * rs, to * sx * es, cs, sy * rs, sx * es), writeable=False)

        def reach(n_tiles, n_out, first, step):
            last = np.minimum(np.arange(n_tiles) * to + to - 1, n_out - 1)
            return (first + np.arange(n_tiles) * to * step) // ti, (first + last * step) // ti

        self.rows = reach(go.tiles_h, go.height, y0, sy)
        self.cols = reach(go.tiles_w, go.width, x0, sx)

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        go = self.grid
        if not self.spatial:
            values = change.values if self.channels is None else change.values[:, self.channels]
            return [Delta(go, change.index, values)]
        if len(change.index) == 0:
            return [Delta.empty(go)]
        self.scratch.assign(change.index, change.values)
        index = affected_tiles(change.mask(), self.rows, self.cols)
        oy, ox = np.divmod(index, go.tiles_w)
        out = self.view[oy, ox]
        if self.channels is not None:
            out = out[:, self.channels]
        self.scratch.assign(change.index, 0.0)
        return [Delta(go, index, go.zero_phantom(index, out))]
