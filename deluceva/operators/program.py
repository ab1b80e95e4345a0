"""Elementwise nodes compiled into a program that a delta kernel runs on rows of positions.

A Conv's epilogue (YOLOX's Sigmoid and Mul, P-Net's PRelu, ...) and standalone elementwise nodes
become one short list of instructions over registers, each register holding the rows of the
positions being recomputed. The kernels run it right after computing their rows
(`deluceva.operators._kernels.run_program`), so a Conv and its activations cost one pass.

Example:
    >>> program = compile_program([ElementwiseNode(sigmoid_spec, ["z"], ["s"]),
    ...                            ElementwiseNode(mul_spec, ["z", "s"], ["y"])], ["z"], "y", layout)  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deluceva.operators._common import Layout, OpSpec
from deluceva.operators._kernels import OPCODES

__all__ = ["ElementwiseNode", "Program", "compile_program", "node_support", "ELEMENTWISE_OP_TYPES"]

_UNARY = ("Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Softplus",
          "Softsign", "Abs", "Neg", "Softmax")
_BINARY = ("Add", "Sub", "Mul", "Div", "PRelu")
# Op types a program can hold: position-wise, so a position's output reads only that position.
ELEMENTWISE_OP_TYPES = frozenset(_UNARY + _BINARY + ("Sum",))
_DEFAULTS = {"LeakyRelu": (0.01, 0.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}
_BIG = float(np.finfo(np.float32).max)


@dataclass
class ElementwiseNode:
    """One node of a program: its spec and the tensor names it reads and writes."""

    spec: OpSpec
    inputs: list[str]
    outputs: list[str]


@dataclass
class Program:
    """Instructions for `run_program`: see `deluceva.operators._kernels`.

    `registers` is how many rows-of-positions buffers the program needs, `result` the register
    that holds its output at the end.
    """

    code: np.ndarray
    params: np.ndarray
    constants: np.ndarray
    constant_rows: np.ndarray
    registers: int
    result: int


def node_support(spec: OpSpec) -> str | None:
    """None when the node can be part of a program, else why not."""
    if spec.op_type not in ELEMENTWISE_OP_TYPES:
        return f"{spec.op_type} is not elementwise"
    out = tuple(spec.output_shapes[0])
    if len(spec.output_shapes) != 1 or len(out) != 4:
        return f"{spec.op_type} output is not 1xCxHxW"
    if spec.op_type in _UNARY and spec.op_type not in ("Clip",) and len(spec.varying) != 1:
        return f"{spec.op_type} needs one varying input"
    if spec.op_type in _BINARY and len(spec.input_shapes) != 2:
        return f"{spec.op_type} needs two inputs"
    for i, shape in enumerate(spec.input_shapes):
        if shape is None:
            continue
        if i in spec.constants:
            if np.broadcast_shapes(np.shape(spec.constants[i]), out) != out:
                return f"constant input {i} broadcasts beyond the output"
        elif tuple(shape) != out:
            return f"varying input {i} has shape {tuple(shape)}, not the output's {out} (broadcast of a varying input)"
    if spec.op_type == "Clip" and spec.varying != [0]:
        return "Clip bounds are not constant"
    if spec.op_type == "PRelu" and spec.varying != [0]:
        return "PRelu slope is not constant"
    if spec.op_type == "Softmax":
        axis = int(spec.attrs.get("axis", -1 if (spec.opset or 0) >= 13 else 1))
        if axis % 4 != 1:
            return f"Softmax on axis {axis} (only the channel axis has a delta kernel)"
        # Before opset 13, axis=1 normalises over C*H*W together, not per position.
        if (spec.opset is None or spec.opset < 13) and tuple(spec.input_shapes[0][2:]) != (1, 1):
            return "Softmax before opset 13 (or of unknown opset) normalises over C*H*W"
    return None


class _Builder:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.code: list[tuple[int, int, int, int]] = []
        self.params: list[tuple[float, float]] = []
        self.constants: list[np.ndarray] = []
        self.constant_rows: list[tuple[int, int]] = []
        self.rows = 0

    def constant(self, value) -> int:
        """Operand number (< 0) of a constant, broadcast to (1, C, H, W)."""
        g = self.layout
        full = np.broadcast_to(np.asarray(value, np.float32), (1, g.channels, g.height, g.width))
        shape = (1,) * (4 - np.ndim(value)) + tuple(np.shape(value))
        if shape[2:] == (1, 1):  # uniform over space: one row for every position
            rows, spatial = np.ascontiguousarray(full[0, :, 0, 0])[None, :], 0
        else:
            rows, spatial = np.ascontiguousarray(full[0].reshape(g.channels, g.positions).T), 1
        self.constant_rows.append((self.rows, spatial))
        self.constants.append(rows)
        self.rows += len(rows)
        return -len(self.constant_rows)

    def emit(self, op: str, dst: int, a: int, b: int = 0, alpha: float = 0.0, beta: float = 0.0) -> None:
        self.code.append((OPCODES[op], dst, a, b))
        self.params.append((alpha, beta))


@dataclass
class _SiLU:
    skip: set  # ids of Sigmoid nodes folded into their Mul
    fused: dict  # id of the Mul -> the tensor it takes x * sigmoid(x) of


def _silu_pairs(nodes: list[ElementwiseNode], result: str) -> _SiLU:
    """Sigmoid(x) -> s, Mul(x, s) pairs where nothing else reads s: one SiLU instruction each."""
    readers: dict[str, int] = {}
    for node in nodes:
        for tensor in node.inputs:
            readers[tensor] = readers.get(tensor, 0) + 1
    sigmoids = {node.outputs[0]: node for node in nodes if node.spec.op_type == "Sigmoid" and not node.spec.constants}
    found = _SiLU(set(), {})
    for node in nodes:
        if node.spec.op_type != "Mul" or node.spec.constants or len(node.inputs) != 2:
            continue
        for s, x in (node.inputs, node.inputs[::-1]):
            sigmoid = sigmoids.get(s)
            if sigmoid is not None and sigmoid.inputs[0] == x and readers.get(s) == 1 and s != result:
                found.skip.add(id(sigmoid))
                found.fused[id(node)] = x
                break
    return found


def _scalar(value, default: float) -> float:
    return default if value is None else float(np.asarray(value).reshape(-1)[0])


def compile_program(nodes: list[ElementwiseNode], preloaded: list[str], result: str, layout: Layout) -> Program:
    """Compile `nodes` (in topological order) reading `preloaded` tensors from registers 0..k-1.

    Args:
        result: the tensor the program's result is (a preloaded one when there are no nodes).
        layout: the layout of every tensor of the program.

    Raises:
        ValueError: a node `node_support` refuses, or a tensor read before it is written.
    """
    registers = {name: i for i, name in enumerate(preloaded)}
    builder = _Builder(layout)
    silu = _silu_pairs(nodes, result)
    for node in nodes:
        spec = node.spec
        if id(node) in silu.skip:
            continue
        if id(node) in silu.fused:
            source = silu.fused[id(node)]
            if source not in registers:
                raise ValueError(f"{spec.name}: input {source!r} is not computed before it")
            registers[node.outputs[0]] = len(registers)
            builder.emit("SiLU", registers[node.outputs[0]], registers[source])
            continue
        reason = node_support(spec)
        if reason is not None:
            raise ValueError(f"{spec.name}: {reason}")

        def operand(i: int) -> int:
            if i in spec.constants:
                return builder.constant(spec.constants[i])
            if node.inputs[i] not in registers:
                raise ValueError(f"{spec.name}: input {node.inputs[i]!r} is not computed before it")
            return registers[node.inputs[i]]

        dst = len(registers)
        op = spec.op_type
        if op == "Sum":
            operands = [operand(i) for i in range(len(node.inputs)) if node.inputs[i]]
            if len(operands) == 1:
                builder.emit("Copy", dst, operands[0])
            else:
                builder.emit("Add", dst, operands[0], operands[1])
            for more in operands[2:]:
                builder.emit("Add", dst, dst, more)
        elif op in _BINARY:
            builder.emit(op, dst, operand(0), operand(1))
        elif op == "Clip":
            low = spec.constants.get(1, spec.attrs.get("min"))
            high = spec.constants.get(2, spec.attrs.get("max"))
            builder.emit(op, dst, operand(0), 0, _scalar(low, -_BIG), _scalar(high, _BIG))
        else:
            alpha, beta = _DEFAULTS.get(op, (0.0, 0.0))
            builder.emit(op, dst, operand(0), 0, float(spec.attrs.get("alpha", alpha)),
                         float(spec.attrs.get("beta", beta)))
        registers[node.outputs[0]] = dst
    if result not in registers:
        raise ValueError(f"the program never computes {result!r}")
    channels = layout.channels
    return Program(
        code=np.array(builder.code, np.int64).reshape(-1, 4),
        params=np.array(builder.params, np.float32).reshape(-1, 2),
        constants=(np.concatenate(builder.constants) if builder.constants else np.zeros((1, channels), np.float32)),
        constant_rows=np.array(builder.constant_rows, np.int64).reshape(-1, 2),
        registers=max(1, len(registers)),
        result=registers[result],
    )
