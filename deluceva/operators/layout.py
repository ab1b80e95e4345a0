"""Delta SpaceToDepth and channel Gather: pure rearrangements, so the change is rearranged alike.

onnxruntime's optimiser turns YOLOX's four strided Slices + Concat (its "Focus" layer) into
SpaceToDepth followed by a channel Gather, which is why both are here.
"""

from __future__ import annotations

import numpy as np

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, register

__all__ = ["DeltaSpaceToDepth", "DeltaGather"]


@register("SpaceToDepth")
class DeltaSpaceToDepth(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        gi, go = spec.input_grids[0], spec.output_grids[0]
        block = int(spec.attrs["blocksize"])
        if gi.tile != block * go.tile or (gi.tiles_h, gi.tiles_w) != (go.tiles_h, go.tiles_w):
            return f"SpaceToDepth tiles do not line up (input tile {gi.tile}, output tile {go.tile})"
        return None

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        go = self.spec.output_grids[0]
        b, t = int(self.spec.attrs["blocksize"]), go.tile
        n, c = change.values.shape[:2]
        # Each input tile is exactly one output tile: channel (bh * b + bw) * C + c.
        blocks = change.values.reshape(n, c, t, b, t, b).transpose(0, 3, 5, 1, 2, 4)
        return [Delta(go, change.index, blocks.reshape(n, b * b * c, t, t))]


@register("Gather")
class DeltaGather(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if int(spec.attrs.get("axis", 0)) not in (1, -3):
            return "Gather off the channel axis"
        if 1 not in spec.constants or np.ndim(spec.constants[1]) != 1:
            return "Gather indices are not a constant 1-D list"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.channels = np.asarray(spec.constants[1], np.int64) % spec.input_grids[0].channels

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        return [Delta(self.spec.output_grids[0], change.index, change.values[:, self.channels])]
