"""Delta elementwise Add, Sum, Sub, Mul, Div; constants broadcast, varying inputs match the output.

Linear cases (sums, differences, scaling by a constant) map changes straight through; x*y, c/x and
x/y keep their varying inputs cached as tiles and compute f(new) - f(old) on the changed tiles.
"""

from __future__ import annotations

import numpy as np

from deluceva.operators._common import Delta, DeltaOperator, Grid, OpSpec, register

__all__ = ["DeltaBinary"]

F32 = np.float32


def _constant_tiles(value: np.ndarray, shape: tuple, grid: Grid) -> np.ndarray:
    """(C, 1, 1) when the constant is uniform over space, else (n_tiles, C, t, t) to index by tile."""
    value = np.asarray(value, F32)
    full = np.broadcast_to(value, shape)
    if (1, 1, *value.shape)[-2:] == (1, 1):
        return np.ascontiguousarray(full[0, :, :1, :1])
    return grid.tile_dense(np.ascontiguousarray(full))


def _take(constant: np.ndarray, index: np.ndarray) -> np.ndarray:
    return constant if constant.ndim == 3 else constant[index]


def _union(deltas: list[Delta]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The union of the changed tiles, and each delta's values spread over it."""
    first = deltas[0].index
    if all(len(d.index) == len(first) and np.array_equal(d.index, first) for d in deltas[1:]):
        return first, [d.values for d in deltas]
    index = np.unique(np.concatenate([d.index for d in deltas]))
    spread = []
    for d in deltas:
        full = np.zeros((len(index), *d.values.shape[1:]), F32)
        full[np.searchsorted(index, d.index)] = d.values
        spread.append(full)
    return index, spread


@register("Add", "Sum", "Sub", "Mul", "Div")
class DeltaBinary(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        out = tuple(spec.output_shapes[0])
        if spec.op_type != "Sum" and len(spec.input_shapes) != 2:
            return f"{spec.op_type} needs two inputs"
        for i, shape in enumerate(spec.input_shapes):
            if i in spec.constants:
                if np.broadcast_shapes(np.shape(spec.constants[i]), out) != out:
                    return f"constant input {i} broadcasts beyond the output"
            elif tuple(shape) != out or spec.input_grids[i] != spec.output_grids[0]:
                return f"varying input {i} has shape {tuple(shape)}, not the output's {out} (broadcast of a varying input)"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.grid = grid = spec.output_grids[0]
        out = tuple(spec.output_shapes[0])
        self.varying = [i for i in range(len(spec.input_shapes)) if i not in spec.constants]
        op = spec.op_type
        self.linear = op in ("Add", "Sum", "Sub") or (len(self.varying) == 1 and (op == "Mul" or self.varying == [0]))
        self.const = {}
        for i, c in spec.constants.items():
            # x / c runs as x * (1 / c); the reciprocal is taken before tiling so phantoms stay 0.
            value = 1.0 / np.asarray(c, F32) if (op == "Div" and self.linear) else c
            self.const[i] = _constant_tiles(value, out, grid)
        self.sign = {i: (-1.0 if op == "Sub" and i == 1 else 1.0) for i in self.varying}
        self.cache: dict[int, np.ndarray] = {}

    def reset(self, inputs, outputs) -> None:
        if self.linear:
            return
        for i in self.varying:
            tiles = self.grid.tile_dense(inputs[i])
            if self.spec.op_type == "Div" and i == 1:
                # Phantom positions of a divisor hold 1, so 0 / 1 keeps them 0 (never NaN).
                tiles = np.where(self.grid.phantom_mask(), tiles, F32(1))
            self.cache[i] = tiles

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        changes = [deltas[i] for i in self.varying]
        if self.linear:
            return [self._linear(changes)]
        index, values = _union(changes)
        if len(index) == 0:
            return [Delta.empty(self.grid)]
        old = {i: self.cache[i][index] for i in self.varying}
        new = {i: old[i] + v for i, v in zip(self.varying, values)}
        for i in self.varying:
            self.cache[i][index] = new[i]
        if self.spec.op_type == "Mul":
            # (a + da)(b + db) - ab = da * b + (a + da) * db: no cancellation of large products.
            (da, db) = values
            out = da * old[1]
            out += new[0] * db
        else:
            a_old, a_new = (old[0], new[0]) if 0 in old else (_take(self.const[0], index),) * 2
            out = a_new / new[1] - a_old / old[1]
        return [Delta(self.grid, index, out)]

    def _linear(self, changes: list[Delta]) -> Delta:
        if len(changes) == 1:
            change = changes[0]
            i = self.varying[0]
            if self.spec.op_type in ("Mul", "Div"):
                other = self.const[1 - i]
                return Delta(self.grid, change.index, change.values * _take(other, change.index))
            if self.sign[i] < 0:
                return Delta(self.grid, change.index, -change.values)
            return change
        index, values = _union(changes)
        out = values[0] * self.sign[self.varying[0]] if self.sign[self.varying[0]] < 0 else values[0].copy()
        for i, v in zip(self.varying[1:], values[1:]):
            out += self.sign[i] * v if self.sign[i] < 0 else v
        return Delta(self.grid, index, out)
