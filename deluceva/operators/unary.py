"""Delta elementwise activations: f(x + dx) - f(x) on the changed tiles, with x cached."""

from __future__ import annotations

from typing import Callable

import numpy as np

from deluceva.operators._common import Delta, DeltaOperator, OpSpec, register

__all__ = ["DeltaUnary", "UNARY_FUNCTIONS"]


def _attr(spec: OpSpec, name: str, default: float) -> float:
    return float(spec.attrs.get(name, default))


def _clip(spec: OpSpec) -> Callable[[np.ndarray], np.ndarray]:
    # Opset 11+ gives min/max as optional constant inputs; older opsets as attributes.
    low = spec.constants.get(1)
    high = spec.constants.get(2)
    low = float(low) if low is not None else _attr(spec, "min", -np.inf)
    high = float(high) if high is not None else _attr(spec, "max", np.inf)
    return lambda x: np.clip(x, low, high)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form never overflows (1 / (1 + exp(-x)) warns for x below about -88).
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _prelu(spec: OpSpec) -> Callable[[np.ndarray], np.ndarray]:
    slope = np.asarray(spec.constants[1], np.float32)
    # Broadcast the slope against the output, then keep its (C, 1, 1) form for tiles.
    slope = np.broadcast_to(slope, spec.output_shapes[0])[0, :, :1, :1] if slope.ndim else slope
    return lambda x: np.where(x >= 0, x, x * slope)


UNARY_FUNCTIONS: dict[str, Callable[[OpSpec], Callable[[np.ndarray], np.ndarray]]] = {
    "Relu": lambda spec: lambda x: np.maximum(x, 0),
    "LeakyRelu": lambda spec: (lambda a: lambda x: np.where(x >= 0, x, a * x))(_attr(spec, "alpha", 0.01)),
    "PRelu": _prelu,
    "Clip": _clip,
    "Sigmoid": lambda spec: _sigmoid,
    "HardSigmoid": lambda spec: (lambda a, b: lambda x: np.clip(a * x + b, 0, 1))(
        _attr(spec, "alpha", 0.2), _attr(spec, "beta", 0.5)
    ),
    "HardSwish": lambda spec: lambda x: x * np.clip(x / 6 + 0.5, 0, 1),
    "Tanh": lambda spec: np.tanh,
    "Elu": lambda spec: (lambda a: lambda x: np.where(x > 0, x, a * np.expm1(np.minimum(x, 0))))(
        _attr(spec, "alpha", 1.0)
    ),
    "Softplus": lambda spec: lambda x: np.logaddexp(x, 0),
    "Softsign": lambda spec: lambda x: x / (1 + np.abs(x)),
    "Abs": lambda spec: np.abs,
    "Neg": lambda spec: np.negative,
}


@register(*UNARY_FUNCTIONS)
class DeltaUnary(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if spec.op_type == "PRelu":
            slope = spec.constants.get(1)
            if slope is None:
                return "PRelu slope is not constant"
            shape = np.broadcast_shapes(slope.shape, spec.output_shapes[0])
            full = np.broadcast_to(slope, shape)
            if shape[-2:] != (1, 1) and not (full == full[..., :1, :1]).all():
                return "PRelu slope varies over space"
        if spec.op_type == "Clip" and any(i not in spec.constants for i in (1, 2) if i < len(spec.input_shapes)):
            return "Clip bounds are not constant"
        if spec.input_shapes[0] != spec.output_shapes[0]:
            return "input and output shapes differ"
        return None

    def __init__(self, spec: OpSpec):
        super().__init__(spec)
        self.function = UNARY_FUNCTIONS[spec.op_type](spec)
        self.grid = spec.input_grids[0]
        self.cache: np.ndarray | None = None

    def reset(self, inputs, outputs) -> None:
        self.cache = self.grid.tile_dense(inputs[0])

    def step(self, deltas: list[Delta | None]) -> list[Delta]:
        change = deltas[0]
        old = self.cache[change.index]
        new = old + change.values
        self.cache[change.index] = new
        out = (self.function(new) - self.function(old)).astype(np.float32, copy=False)
        return [Delta(self.grid, change.index, out)]
