"""Dense segments that only move data out of delta tensors, kept up to date where they changed.

A detector's outputs usually end in Reshape, Transpose and Concat nodes that lay the heads' maps
out as the model's output (YOLOX: three heads into one (1, 3549, 85) array). Run densely, that
segment copies every value every frame (0.3 ms of YOLOX-nano's 7). Each output value is a copy
of one input value, so the executor finds the copy map once, by running the segment on inputs
whose values are their own indices (as `operators/rearrange.py` does for one node), and then
writes only the changed positions' values into the output each frame.
"""

from __future__ import annotations

import numba
import numpy as np

from deluceva.operators.rearrange import EXACT_INDEX_LIMIT

__all__ = ["TAIL_OP_TYPES", "CopyTail"]

# Op types that only move values (given constant shapes, indices and axes).
TAIL_OP_TYPES = frozenset({"Reshape", "Transpose", "Concat", "Flatten", "Squeeze", "Unsqueeze", "Identity",
                           "Slice", "Gather", "Split", "SpaceToDepth", "DepthToSpace"})


@numba.njit(cache=True, nogil=True, error_model="numpy")
def scatter_step(value, offset, channels, changed, count, starts, targets, out) -> None:
    """out[targets[starts[k]:starts[k + 1]]] = the value of (position, channel) k = p * C + c,
    for every changed position p."""
    base = np.uint64(offset)
    for j in range(count[0]):
        p = changed[j]
        for c in range(channels):
            v = value[p, base + np.uint64(c)]
            k = p * channels + c
            for t in range(starts[k], starts[k + 1]):
                out[targets[t]] = v


class CopyTail:
    """The copy map of one dense segment from its delta-tensor inputs to its outputs.

    Args:
        session: an onnxruntime session of the segment.
        inputs: {name: (1, C, H, W) shape} of the segment's inputs, in its feed order.
        outputs: the segment's output names.

    `CopyTail.probe` returns None when the segment does not only copy values.
    """

    def __init__(self, inputs: dict, outputs: list[str], maps: dict):
        self.inputs, self.outputs, self.maps = inputs, outputs, maps

    @classmethod
    def probe(cls, session, inputs: dict, outputs: list[str], output_shapes: dict) -> "CopyTail | None":
        sizes = {name: int(np.prod(shape)) for name, shape in inputs.items()}
        if sum(sizes.values()) >= EXACT_INDEX_LIMIT:
            return None
        feed, start = {}, 0
        for name, shape in inputs.items():
            feed[name] = np.arange(start, start + sizes[name], dtype=np.float32).reshape(shape)
            start += sizes[name]
        try:
            results = session.run(outputs, feed)
        except Exception:
            return None
        index = {}
        for name, result in zip(outputs, results):
            flat = result.astype(np.int64).reshape(-1)
            if (tuple(result.shape) != tuple(output_shapes[name]) or not np.array_equal(flat, result.reshape(-1))
                    or flat.min(initial=0) < 0 or flat.max(initial=0) >= start):
                return None
            index[name] = flat
        maps = {}
        begin = 0
        for name, shape in inputs.items():
            _, channels, height, width = shape
            positions = height * width
            per_output = []
            for out_name in outputs:
                flat = index[out_name]
                taken = np.flatnonzero((flat >= begin) & (flat < begin + sizes[name]))
                source = flat[taken] - begin  # NCHW index c * P + p into the input
                channel, position = np.divmod(source, positions)
                key = position * channels + channel  # channels-last, as the delta tensor stores it
                order = np.argsort(key, kind="stable")
                starts = np.searchsorted(key[order], np.arange(positions * channels + 1)).astype(np.int64)
                per_output.append((out_name, starts, taken[order].astype(np.int64)))
            maps[name] = per_output
            begin += sizes[name]
        return cls(inputs, outputs, maps)
