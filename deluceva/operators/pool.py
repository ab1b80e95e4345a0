"""Delta MaxPool, AveragePool and GlobalAveragePool.

MaxPool keeps its input in a -inf padded buffer and recomputes the output tiles whose window saw a
change (one onnxruntime call on the gathered patches), minus the cached old output. AveragePool is
linear: the windowed sum of the change, divided by each position's window count.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from deluceva.operators._common import (
    Delta, DeltaOperator, OpSpec, TiledBuffer, affected_tiles, register, resolve_pads, take_tiles, window_ranges,
)
from deluceva.operators._ort import single_node_session

__all__ = ["DeltaPool", "DeltaGlobalAveragePool"]


def _counts(size: int, out: int, k: int, s: int, d: int, begin: int, end: int, include_pad: bool) -> np.ndarray:
    """Per output index along one axis, how many window taps the average divides by."""
    taps = np.arange(out)[:, None] * s - begin + np.arange(k)[None, :] * d
    low, high = (-begin, size + end) if include_pad else (0, size)
    return ((taps >= low) & (taps < high)).sum(axis=1)


@register("MaxPool", "AveragePool")
class DeltaPool(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if len(spec.output_shapes) > 1:
            return "MaxPool with an Indices output has no delta kernel"
        if len(spec.attrs.get("kernel_shape", [])) != 2:
            return "only 2-D pooling has a delta kernel"
        if spec.op_type == "AveragePool" and any(d != 1 for d in spec.attrs.get("dilations", [1, 1])):
            return "AveragePool with dilations has no delta kernel"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        a = spec.attrs
        self.in_grid, self.out_grid = gi, go = spec.input_grids[0], spec.output_grids[0]
        kernel = tuple(a["kernel_shape"])
        strides = tuple(a.get("strides", [1, 1]))
        dilations = tuple(a.get("dilations", [1, 1]))
        top, left, bottom, right = resolve_pads(a, (gi.height, gi.width), kernel, strides, dilations)
        to, ti = go.tile, gi.tile
        patch = tuple((to - 1) * s + (k - 1) * d + 1 for k, s, d in zip(kernel, strides, dilations))
        need = [(n - 1) * to * s + p for n, s, p in zip((go.tiles_h, go.tiles_w), strides, patch)]
        extra_h = max(0, need[0] - top - gi.tiles_h * ti)
        extra_w = max(0, need[1] - left - gi.tiles_w * ti)
        self.is_max = spec.op_type == "MaxPool"
        # MaxPool ignores padding and ceil-mode overhang: -inf there never wins a max.
        self.buffer = TiledBuffer(gi, (top, left, extra_h, extra_w), -np.inf if self.is_max else 0.0)
        self.windows = self.buffer.windows(go, strides, patch)
        # Past this many output tiles, pooling the whole buffer reads less than the patches do.
        self.dense_from = self.buffer.data[0].size // (patch[0] * patch[1])
        self.rows = window_ranges(go.tiles_h, to, strides[0], top, patch[0], ti, gi.tiles_h)
        self.cols = window_ranges(go.tiles_w, to, strides[1], left, patch[1], ti, gi.tiles_w)
        attrs = {"kernel_shape": list(kernel), "strides": list(strides)}
        if self.is_max:
            attrs["dilations"] = list(dilations)
        else:
            # The session sums (mean of k taps times k); `scale` turns sums into ONNX's averages.
            attrs["count_include_pad"] = 1
            include = bool(a.get("count_include_pad", 0))
            rows = _counts(gi.height, go.height, kernel[0], strides[0], 1, top, bottom, include)
            cols = _counts(gi.width, go.width, kernel[1], strides[1], 1, left, right, include)
            scale = (kernel[0] * kernel[1]) / np.maximum(rows[:, None] * cols[None, :], 1)
            self.scale = replace(go, channels=1).tile_dense(scale.astype(np.float32))
        self.session = single_node_session(spec.op_type, [], attrs, gi.channels, spec.threads)
        self.cache: np.ndarray | None = None

    def reset(self, inputs, outputs) -> None:
        if self.is_max:
            self.buffer.load(inputs[0])
            self.cache = self.out_grid.tile_dense(outputs[0])

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        go = self.out_grid
        if len(change.index) == 0:
            return [Delta.empty(go)]
        if self.is_max:
            self.buffer.add(change.index, change.values)
        else:
            self.buffer.assign(change.index, change.values)
        index = affected_tiles(change.mask(), self.rows, self.cols)
        oy, ox = np.divmod(index, go.tiles_w)
        if len(index) > self.dense_from:
            result = take_tiles(self.session(self.buffer.data[None])[0], go, index)
        else:
            result = self.session(self.windows[oy, ox])
        if self.is_max:
            # Phantom outputs may be -inf (all-padding windows): zero them before subtracting.
            new = go.zero_phantom(index, result)
            out = new - self.cache[index]
            self.cache[index] = new
        else:
            self.buffer.assign(change.index, 0.0)
            out = result * self.scale[index]
        return [Delta(go, index, out)]


@register("GlobalAveragePool")
class DeltaGlobalAveragePool(DeltaOperator):
    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        g = spec.input_grids[0]
        self.area = g.height * g.width
        self.out_grid = spec.output_grids[0]

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        if len(change.index) == 0:
            return [Delta.empty(self.out_grid)]
        t = self.out_grid.tile
        out = np.zeros((1, self.out_grid.channels, t, t), np.float32)
        out[0, :, 0, 0] = change.values.sum(axis=(0, 2, 3), dtype=np.float64) / self.area
        return [Delta(self.out_grid, np.zeros(1, np.int64), out)]
