"""Delta elementwise nodes: activations, Add/Sub/Mul/Div/Sum, PRelu, Clip, channel Softmax.

The output changes only where an input changed: those positions' rows are gathered from the
inputs' seen values, run through the node's program (`operators/program.py`) and emitted.
"""

from __future__ import annotations

import numba
import numpy as np

from deluceva.operators._common import DeltaOperator, DeltaTensor, OpSpec, register
from deluceva.operators._kernels import collect_marked, emit_rows, gather_rows, prefetch_rows, run_program
from deluceva.operators.program import ELEMENTWISE_OP_TYPES, ElementwiseNode, compile_program, node_support

__all__ = ["DeltaElementwise", "union_of_changes", "CHUNK_BYTES"]

# Rows are recomputed in chunks whose registers stay within this many bytes (in cache).
CHUNK_BYTES = 1 << 18


def chunk_rows(row_bytes: int, limit: int = 1024) -> int:
    """Rows per chunk: as many as fit CHUNK_BYTES, between 16 and `limit`."""
    return int(max(16, min(limit, CHUNK_BYTES // max(1, row_bytes))))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def union_of_changes(changed, counts, mark, found) -> tuple:
    """(positions, n): the changed positions of all inputs, ascending, once each.

    One input's list is used as it is; several are merged through `mark` into `found`.
    """
    if len(changed) == 1:
        return changed[0], counts[0][0]
    n = 0
    for k in range(len(changed)):
        listing = changed[k]
        for j in range(counts[k][0]):
            p = listing[j]
            if mark[p] == 0:
                mark[p] = 1
                found[n] = p
                n += 1
    collect_marked(mark, found, n)
    return found, n


@numba.njit(cache=True, nogil=True, error_model="numpy")
def elementwise_step(values, offsets, changed, counts, out_value, out_offset, out_changed, out_count, threshold,
                     mark, found, registers, bits, code, params, constants, constant_rows, result) -> None:
    """Recompute the output at every position where an input changed, and emit it."""
    positions, n = union_of_changes(changed, counts, mark, found)
    chunk = registers.shape[1]
    emitted = 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        prefetch_rows(out_value, out_offset, registers.shape[2], positions, start, size)  # see `conv_step`
        for k in range(len(values)):
            gather_rows(values[k], offsets[k], positions, start, size, registers[k])
        run_program(registers, size, positions, start, code, params, constants, constant_rows, bits)
        emitted = emit_rows(registers[result], positions, start, size, out_value, out_offset, threshold[0],
                            out_changed, emitted)
    out_count[0] = emitted


@register(*sorted(ELEMENTWISE_OP_TYPES))
class DeltaElementwise(DeltaOperator):
    """One elementwise node, or a chain of them (`epilogue`) run in the same pass."""

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        return node_support(spec)

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor],
                 node: ElementwiseNode | None = None, epilogue: list[ElementwiseNode] = (), result: str | None = None,
                 buffers=None):
        super().__init__(spec, inputs, outputs, buffers)
        varying = spec.varying
        node = node or ElementwiseNode(spec, [f"in{i}" for i in range(len(spec.input_shapes))], ["out"])
        names = [node.inputs[i] for i in varying]
        out = outputs[0]
        program = compile_program([node, *epilogue], names, result or node.outputs[0], out.layout)
        channels = out.layout.channels
        rows = chunk_rows(4 * channels * program.registers)
        registers = self.buffers.scratch("registers", (program.registers, rows, channels), np.float32)
        sources = [inputs[i] for i in varying]
        self.calls = [(elementwise_step, (
            tuple(s.storage for s in sources), np.array([s.offset for s in sources], np.int64),
            tuple(s.changed for s in sources), tuple(s.count for s in sources),
            out.storage, out.offset, out.changed, out.count, out.threshold,
            self.buffers.scratch("mark", (out.layout.positions,), np.uint8),
            self.buffers.scratch("found", (out.layout.positions,), np.int64),
            registers, self.buffers.scratch("bits", (2 * rows * channels,), np.int32),
            program.code, program.params, program.constants, program.constant_rows, program.result,
        ))]
