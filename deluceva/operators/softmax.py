"""Delta Softmax over the channel axis: recompute the changed positions, minus the cached output."""

from __future__ import annotations

import numpy as np

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, register

__all__ = ["DeltaSoftmax"]


@register("Softmax")
class DeltaSoftmax(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        axis = int(spec.attrs.get("axis", -1 if (spec.opset or 0) >= 13 else 1))
        if axis % 4 != 1:
            return f"Softmax on axis {axis} (only the channel axis has a delta kernel)"
        # Before opset 13, axis=1 normalises over C*H*W together, not per position.
        if (spec.opset is None or spec.opset < 13) and spec.input_shapes[0][2:] != (1, 1):
            return "Softmax before opset 13 (or of unknown opset) normalises over C*H*W"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.grid = spec.input_grids[0]

    def reset(self, inputs, outputs) -> None:
        self.inputs = self.grid.tile_dense(inputs[0])
        self.outputs = self.grid.tile_dense(outputs[0])

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        index = change.index
        x = self.inputs[index] + change.values
        self.inputs[index] = x
        e = np.exp(x - x.max(axis=1, keepdims=True))
        new = self.grid.zero_phantom(index, e / e.sum(axis=1, keepdims=True))
        out = new - self.outputs[index]
        self.outputs[index] = new
        return [Delta(self.grid, index, out)]
