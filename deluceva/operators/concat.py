"""Delta Concat on the channel axis: a position changes where any input changed.

Where the executor lets an input live in the output's own storage (`DeltaTensor.share_storage`),
its producer already wrote its new rows there and the Concat only merges the lists of changed
positions; any other input's changed rows are copied in. Nothing is filtered here: each input
was filtered by its producer.
"""

from __future__ import annotations

import numba
import numpy as np

from deluceva.operators._common import DeltaOperator, DeltaTensor, OpSpec, register
from deluceva.operators.elementwise import union_of_changes

__all__ = ["DeltaConcat"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def concat_step(values, offsets, targets, copied, changed, counts, out_value, out_changed, out_count, mark, found) -> None:
    """Copy the changed rows of inputs not stored in the output (`copied`); list the union."""
    for k in range(len(values)):
        if not copied[k]:
            continue
        source = values[k]
        listing = changed[k]
        width = np.uint64(targets[k + 1] - targets[k])
        into, base = np.uint64(targets[k]), np.uint64(offsets[k])
        for j in range(counts[k][0]):
            p = listing[j]
            for c in range(width):
                out_value[p, into + c] = source[p, base + c]
    positions, n = union_of_changes(changed, counts, mark, found)
    for j in range(n):
        out_changed[j] = positions[j]
    out_count[0] = n


@register("Concat")
class DeltaConcat(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if int(spec.attrs.get("axis", 0)) not in (1, -3):
            return f"Concat on axis {spec.attrs.get('axis')} (only the channel axis has a delta kernel)"
        if spec.constants:
            return "Concat of a constant input has no delta kernel"
        return None

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor], buffers=None):
        super().__init__(spec, inputs, outputs, buffers)
        out = outputs[0]
        targets = out.offset + np.cumsum([0] + [t.layout.channels for t in inputs]).astype(np.int64)
        copied = np.array([not (t.storage is out.storage and t.offset == targets[k]) for k, t in enumerate(inputs)])
        self.calls = [(concat_step, (
            tuple(t.storage for t in inputs), np.array([t.offset for t in inputs], np.int64), targets, copied,
            tuple(t.changed for t in inputs), tuple(t.count for t in inputs),
            out.storage, out.changed, out.count,
            self.buffers.scratch("mark", (out.layout.positions,), np.uint8),
            self.buffers.scratch("found", (out.layout.positions,), np.int64),
        ))]
