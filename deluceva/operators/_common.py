"""Shared pieces of the delta operators: tensor layouts, delta tensors, node specs, the registry.

A tensor of shape (1, C, H, W) that delta operators read or write is a `DeltaTensor`: its value as
its consumers have seen it, channels-last, one row of C values per position (flat index
``y * W + x``), and this frame's changed positions, ascending. Operators recompute their output
at the positions whose inputs changed and pass on only the positions whose new value differs
from the seen one by more than the output's filter threshold; what they hold back stays the
difference between the true value and the seen one, so it passes once it grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    from deluceva.operators._buffers import Buffers

__all__ = [
    "Layout",
    "DeltaTensor",
    "OpSpec",
    "DeltaOperator",
    "register",
    "get_operator",
    "delta_support",
    "registered_op_types",
    "resolve_pads",
    "UnsupportedOperator",
]

DTYPE = np.float32


@dataclass(frozen=True)
class Layout:
    """The shape of a (1, C, H, W) float tensor."""

    channels: int
    height: int
    width: int

    @property
    def positions(self) -> int:
        return self.height * self.width


class DeltaTensor:
    """A tensor between delta operators: its seen value and this frame's changed positions.

    Attributes:
        storage: (H*W + 1, width) float32: row p holds the value at position p in columns
            [offset, offset + C); the last row is always zero, so a kernel can point a window's
            taps that fall outside the tensor at it instead of branching. Several tensors share
            one storage when they are the parts of a channel Concat (see `share_storage`).
        offset: the tensor's first column in `storage`.
        changed: (H*W,) int64; the first `count[0]` entries are this frame's changed positions,
            ascending.
        count: (1,) int64.
        threshold: (1,) float32, the filter threshold its producer emits against (0: exact).
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self.storage = np.zeros((layout.positions + 1, layout.channels), DTYPE)
        self.offset = 0
        self.changed = np.zeros(layout.positions, np.int64)
        self.count = np.zeros(1, np.int64)
        self.threshold = np.zeros(1, DTYPE)

    def share_storage(self, storage: np.ndarray, offset: int) -> None:
        """Live in columns [offset, offset + C) of another tensor's storage."""
        self.storage, self.offset = storage, offset

    @property
    def value(self) -> np.ndarray:
        """(H*W, C) view of the seen value."""
        return self.storage[: self.layout.positions, self.offset: self.offset + self.layout.channels]

    def load(self, dense: np.ndarray) -> None:
        """Take a dense (1, C, H, W) value as seen; no position is changed."""
        from deluceva.operators._kernels import load_rows

        g = self.layout
        load_rows(np.ascontiguousarray(dense, DTYPE).reshape(g.channels, g.positions), self.storage, self.offset)
        self.count[0] = 0

    def dense(self) -> np.ndarray:
        """The seen value as a new (1, C, H, W) array."""
        g = self.layout
        return np.ascontiguousarray(self.value.T).reshape(1, g.channels, g.height, g.width)

    def positions(self) -> np.ndarray:
        """This frame's changed positions (a copy)."""
        return self.changed[: self.count[0]].copy()

    @property
    def density(self) -> float:
        return int(self.count[0]) / self.layout.positions


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

    `input_layouts[i]` is None for a constant input (its value is in `constants[i]`) or for a
    tensor that is not a float (1, C, H, W) tensor.
    """

    name: str
    op_type: str
    attrs: dict
    input_shapes: list[tuple[int, ...]]
    output_shapes: list[tuple[int, ...]]
    constants: dict[int, np.ndarray] = field(default_factory=dict)
    input_layouts: list[Layout | None] = field(default_factory=list)
    output_layouts: list[Layout | None] = field(default_factory=list)
    opset: int | None = None  # the model's default-domain opset, where known

    @property
    def varying(self) -> list[int]:
        """Indices of the inputs that change from frame to frame (not constant, not omitted)."""
        return [i for i, shape in enumerate(self.input_shapes) if i not in self.constants and shape is not None]


class UnsupportedOperator(ValueError):
    """Raised for an op type that has no delta variant."""


class DeltaOperator:
    """Base class of the delta variants.

    An operator is bound to the `DeltaTensor`s it reads (None for constant or omitted inputs)
    and writes. `calls` lists its work for one frame as (compiled kernel, arguments) pairs: the
    executor's frame loop is nothing but `kernel(*arguments)` for each, so all of an operator's
    buffers are allocated here, once; working buffers come from `buffers`, which the executor
    shares between its operators. `supports` says why a node cannot run as delta, or None.

    Example:
        >>> operator = get_operator("Relu")(spec, [x], [y])            # doctest: +SKIP
        >>> operator.run()                      # y.changed[:y.count[0]] and y.value updated
    """

    op_type: ClassVar[str] = ""

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor],
                 buffers: "Buffers | None" = None):
        from deluceva.operators._buffers import Buffers

        self.spec = spec
        self.inputs = inputs
        self.outputs = outputs
        self.buffers = buffers if buffers is not None else Buffers()
        self.calls: list[tuple[Callable, tuple]] = []

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        return None

    def run(self) -> None:
        """One frame: the outputs' changed positions and seen values from the inputs' changes."""
        for kernel, arguments in self.calls:
            kernel(*arguments)


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
    variable = spec.varying
    if not variable:
        return "all inputs are constant"
    for i in variable:
        if spec.input_layouts[i] is None:
            return f"input {i} is not a 1xCxHxW float tensor"
    for i, layout in enumerate(spec.output_layouts):
        if layout is None:
            return f"output {i} is not a 1xCxHxW float tensor"
    return _REGISTRY[spec.op_type].supports(spec)
