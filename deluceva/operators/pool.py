"""Delta MaxPool and AveragePool (2-D): recompute the windows that read a changed position."""

from __future__ import annotations

import numba
import numpy as np

from deluceva.operators._common import DeltaOperator, DeltaTensor, OpSpec, register, resolve_pads
from deluceva.operators._kernels import collect_marked, emit_rows, mark_window, window_geometry
from deluceva.operators.elementwise import chunk_rows

__all__ = ["DeltaPool"]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def pool_step(x, x_offset, in_height, in_width, in_changed, in_count, out_value, out_offset, out_width, out_changed,
              out_count, threshold, geometry, is_max, divisor_h, divisor_w, mark, found, rows) -> None:
    """Recompute max or average over each window that read a change, and emit.

    An average divides output (oy, ox) by divisor_h[oy] * divisor_w[ox].
    """
    kh, kw, sh, sw, dh, dw, top, left = window_geometry(geometry)
    n = mark_window(in_changed, in_count[0], in_width, geometry, (out_value.shape[0] - 1) // out_width, out_width,
                    mark, found)
    collect_marked(mark, found, n)
    channels = np.uint64(rows.shape[1])
    base = np.uint64(x_offset)
    chunk = rows.shape[0]
    acc = np.empty(rows.shape[1], np.float32)  # local: see `deluceva.operators._kernels`
    emitted = 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        for j in range(size):
            q = found[start + j]
            oy = q // out_width
            ox = q - oy * out_width
            acc[:] = -np.inf if is_max else 0.0
            for ky in range(kh):
                iy = oy * sh - top + ky * dh
                if iy < 0 or iy >= in_height:
                    continue
                for kx in range(kw):
                    ix = ox * sw - left + kx * dw
                    if ix < 0 or ix >= in_width:
                        continue
                    p = iy * in_width + ix
                    if is_max:
                        for c in range(channels):
                            acc[c] = max(acc[c], x[p, base + c])
                    else:
                        for c in range(channels):
                            acc[c] += x[p, base + c]
            if is_max:
                for c in range(channels):
                    rows[j, c] = acc[c]
            else:
                divisor = np.float32(divisor_h[oy] * divisor_w[ox])
                for c in range(channels):
                    rows[j, c] = acc[c] / divisor
        emitted = emit_rows(rows, found, start, size, out_value, out_offset, threshold[0], out_changed, emitted)
    out_count[0] = emitted


def _divisors(size: int, out: int, k: int, s: int, d: int, begin: int, end: int, include_pad: bool) -> np.ndarray:
    """Per output index along one axis, how many window taps an average divides by: those inside
    the input, or with `include_pad` inside the padded input (as onnxruntime counts)."""
    taps = np.arange(out)[:, None] * s - begin + np.arange(k)[None, :] * d
    low, high = (-begin, size + end) if include_pad else (0, size)
    return ((taps >= low) & (taps < high)).sum(axis=1).astype(np.int64)


@register("MaxPool", "AveragePool")
class DeltaPool(DeltaOperator):
    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if len(spec.output_shapes) > 1:
            return "MaxPool with an Indices output has no delta kernel"
        if len(spec.attrs.get("kernel_shape", [])) != 2:
            return "only 2-D pooling has a delta kernel"
        if spec.op_type == "AveragePool" and any(d != 1 for d in spec.attrs.get("dilations", [1, 1])):
            return "AveragePool with dilations has no delta kernel"
        if int(spec.attrs.get("storage_order", 0)) != 0:
            return "MaxPool with storage_order has no delta kernel"
        return None

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor], buffers=None):
        super().__init__(spec, inputs, outputs, buffers)
        a = spec.attrs
        x, out = inputs[0], outputs[0]
        kernel = tuple(int(k) for k in a["kernel_shape"])
        strides = tuple(int(s) for s in a.get("strides", [1, 1]))
        dilations = tuple(int(d) for d in a.get("dilations", [1, 1]))
        top, left, bottom, right = resolve_pads(a, (x.layout.height, x.layout.width), kernel, strides, dilations)
        geometry = np.array([*kernel, *strides, *dilations, top, left], np.int64)
        positions = out.layout.positions
        channels = out.layout.channels
        include_pad = bool(int(a.get("count_include_pad", 0)))
        divisor_h = _divisors(x.layout.height, out.layout.height, kernel[0], strides[0], dilations[0], top, bottom,
                              include_pad)
        divisor_w = _divisors(x.layout.width, out.layout.width, kernel[1], strides[1], dilations[1], left, right,
                              include_pad)
        self.calls = [(pool_step, (
            x.storage, x.offset, x.layout.height, x.layout.width, x.changed, x.count,
            out.storage, out.offset, out.layout.width, out.changed, out.count, out.threshold,
            geometry, spec.op_type == "MaxPool", divisor_h, divisor_w,
            self.buffers.scratch("mark", (positions,), np.uint8), self.buffers.scratch("found", (positions,), np.int64),
            self.buffers.scratch("rows", (chunk_rows(4 * channels), channels), np.float32),
        ))]
