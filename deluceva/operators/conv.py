"""Delta Conv: the output changes by the convolution (without bias) of the input's change.

Changed input tiles are scattered into a zero, padded scratch image; the patch under every
affected output tile is gathered into one batch and convolved in one call (onnxruntime, VALID
padding), which lands directly in the output's tile layout.
"""

from __future__ import annotations

import numpy as np

from deluceva.operators._common import (
    Delta,
    DeltaOperator,
    OpSpec,
    TiledBuffer,
    affected_tiles,
    register,
    resolve_pads,
    take_tiles,
    window_ranges,
)
from deluceva.operators._ort import single_node_session

__all__ = ["DeltaConv", "ConvWindows"]


class ConvWindows:
    """Where a Conv's output tiles read their input, for the delta Conv and the fused step.

    `patch`: the input patch (halo included) under one output tile; `buffer_pad`: the padding
    (top, left, bottom, right) an input buffer needs so every patch lies inside it, the Conv's
    own zero padding included; `rows`/`cols`: per output tile, the input tiles its patch reads.
    """

    def __init__(self, spec: OpSpec):
        in_grid, out_grid = spec.input_grids[0], spec.output_grids[0]
        kh, kw = spec.constants[1].shape[2:]
        self.strides = tuple(spec.attrs.get("strides", [1, 1]))
        self.dilations = tuple(spec.attrs.get("dilations", [1, 1]))
        self.group = int(spec.attrs.get("group", 1))
        self.pads = resolve_pads(spec.attrs, (in_grid.height, in_grid.width), (kh, kw), self.strides, self.dilations)
        top, left = self.pads[0], self.pads[1]
        ti, to = in_grid.tile, out_grid.tile
        self.patch = ((to - 1) * self.strides[0] + (kh - 1) * self.dilations[0] + 1,
                      (to - 1) * self.strides[1] + (kw - 1) * self.dilations[1] + 1)
        # Enough room below and right for the last output tile's patch.
        need_h = (out_grid.tiles_h - 1) * to * self.strides[0] + self.patch[0]
        need_w = (out_grid.tiles_w - 1) * to * self.strides[1] + self.patch[1]
        self.buffer_pad = (top, left, max(0, need_h - top - in_grid.tiles_h * ti),
                           max(0, need_w - left - in_grid.tiles_w * ti))
        self.rows = window_ranges(out_grid.tiles_h, to, self.strides[0], top, self.patch[0], ti, in_grid.tiles_h)
        self.cols = window_ranges(out_grid.tiles_w, to, self.strides[1], left, self.patch[1], ti, in_grid.tiles_w)


@register("Conv")
class DeltaConv(DeltaOperator):
    op_type = "Conv"

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if 1 not in spec.constants:
            return "Conv weights are not constant"
        if len(spec.input_shapes[1]) != 4:
            return "only 2-D convolution has a delta kernel"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        weight = spec.constants[1].astype(np.float32)
        self.in_grid, self.out_grid = spec.input_grids[0], spec.output_grids[0]
        kh, kw = weight.shape[2:]
        window = ConvWindows(spec)
        self.patch, self.rows, self.cols = window.patch, window.rows, window.cols
        self.scratch = TiledBuffer(self.in_grid, window.buffer_pad)
        self.windows = self.scratch.windows(self.out_grid, window.strides, self.patch)
        # Past this many output tiles, convolving the whole scratch reads less than the patches do.
        self.dense_from = self.scratch.data[0].size // (self.patch[0] * self.patch[1])
        self.pointwise = (
            (kh, kw) == (1, 1) and window.strides == (1, 1) and window.group == 1
            and window.pads == (0, 0, 0, 0) and self.in_grid.tile == self.out_grid.tile
        )
        if self.pointwise:
            self.matrix = weight.reshape(weight.shape[0], weight.shape[1])
        else:
            self.session = single_node_session(
                "Conv",
                [weight],
                {"strides": list(window.strides), "dilations": list(window.dilations), "group": window.group},
                in_channels=self.in_grid.channels,
                threads=spec.threads,
            )

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        if len(change.index) == 0:
            return [Delta.empty(self.out_grid)]
        if self.pointwise:
            n, c, t, _ = change.values.shape
            flat = change.values.transpose(1, 0, 2, 3).reshape(c, -1)
            out = (self.matrix @ flat).reshape(-1, n, t, t).transpose(1, 0, 2, 3)
            return [Delta(self.out_grid, change.index, np.ascontiguousarray(out))]
        self.scratch.assign(change.index, change.values)
        out_index = affected_tiles(change.mask(), self.rows, self.cols)
        if len(out_index) > self.dense_from:
            out = take_tiles(self.session(self.scratch.data[None])[0], self.out_grid, out_index)
        else:
            oy, ox = np.divmod(out_index, self.out_grid.tiles_w)
            out = self.session(self.windows[oy, ox])
        self.scratch.assign(change.index, 0.0)
        return [Delta(self.out_grid, out_index, self.out_grid.zero_phantom(out_index, out))]
