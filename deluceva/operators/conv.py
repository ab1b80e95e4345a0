"""Delta Conv, with its elementwise epilogue in the same pass.

The output is recomputed at the positions whose window reads a changed input position: each
one's window (kh x kw x C values, from the input's seen value, zeros outside) is gathered into a
row, the rows are multiplied by the weights in one BLAS product per chunk, the bias and the
epilogue program (`operators/program.py`) are applied, and the filter emits the rows that changed
enough. Three shapes of the work:

- pointwise (1x1, stride 1, no padding, one group): the output positions are the changed input
  positions, and a row is the input's own row;
- depthwise (one input channel per group, as many outputs): a direct loop per position, no product;
- any other (kernel, stride, dilation, padding, groups): gathered windows, one product per group.
"""

from __future__ import annotations

import numba
import numpy as np
# numba's np.dot calls SciPy's BLAS, which it would otherwise load on the first product: loaded
# now, so that the executor's thread limit (threadpoolctl limits only loaded libraries) covers it.
import scipy.linalg.cython_blas  # noqa: F401

from deluceva.operators._common import DeltaOperator, DeltaTensor, OpSpec, register, resolve_pads
from deluceva.operators._kernels import (FINISH_KINDS, OPCODES, collect_marked, emit_rows, finish_rows, gather_rows,
                                        mark_window, prefetch_rows, run_program, window_geometry)
from deluceva.operators.elementwise import chunk_rows
from deluceva.operators.program import ElementwiseNode, compile_program

__all__ = ["DeltaConv", "ConvGeometry"]

POINTWISE, DEPTHWISE, GENERAL = 0, 1, 2


class ConvGeometry:
    """A 2-D Conv's window: kernel, strides, dilations, explicit pads and groups, and its kind."""

    def __init__(self, spec: OpSpec):
        weight = spec.constants[1]
        self.out_channels, self.group_channels, kh, kw = weight.shape
        self.kernel = (int(kh), int(kw))
        self.strides = tuple(int(s) for s in spec.attrs.get("strides", [1, 1]))
        self.dilations = tuple(int(d) for d in spec.attrs.get("dilations", [1, 1]))
        self.groups = int(spec.attrs.get("group", 1))
        layout = spec.input_layouts[0]
        self.pads = resolve_pads(spec.attrs, (layout.height, layout.width), self.kernel, self.strides, self.dilations)
        if self.kernel == (1, 1) and self.strides == (1, 1) and self.pads == (0, 0, 0, 0) and self.groups == 1:
            self.kind = POINTWISE
        elif self.groups == layout.channels == self.out_channels and self.group_channels == 1:
            self.kind = DEPTHWISE
        else:
            self.kind = GENERAL

    def as_array(self) -> np.ndarray:
        """(kh, kw, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left), for kernels."""
        return np.array([*self.kernel, *self.strides, *self.dilations, self.pads[0], self.pads[1]], np.int64)


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _next_position(q, previous, oy, ox, width):
    """(oy, ox) of position q, from those of the previous position when q follows it in its row
    (no division: sorted positions come in runs)."""
    if q == previous + 1 and ox + 1 < width:
        return oy, ox + 1
    oy = q // width
    return oy, q - oy * width


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _tap_rows(oy, ox, in_height, in_width, geometry, zero_row, rows) -> None:
    """rows[t] = the input row under tap t = ky * kw + kx of output (oy, ox) (`zero_row`, which
    is always zero, where the tap falls in the padding)."""
    kh, kw, sh, sw, dh, dw, top, left = window_geometry(geometry)
    t = 0
    for ky in range(kh):
        iy = oy * sh - top + ky * dh
        inside = 0 <= iy < in_height
        for kx in range(kw):
            ix = ox * sw - left + kx * dw
            rows[t] = iy * in_width + ix if (inside and 0 <= ix < in_width) else zero_row
            t += 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _windows(x, offset, in_height, in_width, positions, start, n, out_width, geometry, first, channels, rows, cols) -> None:
    """cols[j] = the window of output positions[start + j] in (ky, kx, c) order, channels
    [first, first + channels) of the input (one group's).

    Where the channels are whole storage rows and the taps of a window row are adjacent
    (undilated), a window row inside the input is one contiguous block of kw * C values: copied
    as one, without working out each tap's row (the 12->16 stem at 208x208: 39 -> 13 ns a window).
    """
    taps = rows.shape[0]
    zero_row = x.shape[0] - 1
    base = np.uint64(offset + first)
    width = np.uint64(channels)
    kh, kw, sh, sw, dh, dw, top, left = window_geometry(geometry)
    whole_rows = dw == 1 and offset + first == 0 and channels == x.shape[1]
    flat = x.reshape(x.shape[0] * x.shape[1])
    span = np.uint64(kw) * width
    oy, ox, previous = 0, 0, -2
    for j in range(n):
        q = positions[start + j]
        oy, ox = _next_position(q, previous, oy, ox, out_width)
        previous = q
        iy, ix = oy * sh - top, ox * sw - left
        if whole_rows and iy >= 0 and iy + (kh - 1) * dh < in_height and ix >= 0 and ix + kw - 1 < in_width:
            at = np.uint64(0)
            for ky in range(kh):
                source = np.uint64((iy + ky * dh) * in_width + ix) * width
                for i in range(span):
                    cols[j, at + i] = flat[source + i]
                at += span
            continue
        _tap_rows(oy, ox, in_height, in_width, geometry, zero_row, rows)
        for t in range(taps):
            r = rows[t]
            at = np.uint64(t) * width
            for c in range(width):
                cols[j, at + c] = x[r, base + c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _depthwise(x, offset, in_height, in_width, positions, start, n, out_width, geometry, taps, rows, out) -> None:
    """out[j] = the depthwise convolution (no bias) at output positions[start + j].

    Sums go to a local row first: writing `out` directly, the compiler cannot rule out that it
    overlaps `x` and gives up vectorising (2.5x slower). A 3x3 window inside the input reads its
    nine rows at fixed distances from its first, without working out each tap's row; one that
    reaches into the padding reads the zero row there.
    """
    channels = np.uint64(out.shape[1])
    width = np.uint64(x.shape[1])
    base = np.uint64(offset)
    zero_row = x.shape[0] - 1
    flat = x.reshape(x.shape[0] * x.shape[1])
    kh, kw, sh, sw, dh, dw, top, left = window_geometry(geometry)
    # Distance of tap (ky, kx) from tap (0, 0) in `flat`, for the 3x3 form.
    across, down = np.uint64(dw) * width, np.uint64(dh * in_width) * width
    d1, d2 = across, across + across
    d3, d4, d5 = down, down + across, down + across + across
    d6, d7, d8 = down + down, down + down + across, down + down + across + across
    three = kh == 3 and kw == 3
    acc = np.empty(out.shape[1], np.float32)
    oy, ox, previous = 0, 0, -2
    for j in range(n):
        q = positions[start + j]
        oy, ox = _next_position(q, previous, oy, ox, out_width)
        previous = q
        iy, ix = oy * sh - top, ox * sw - left
        if three and iy >= 0 and iy + 2 * dh < in_height and ix >= 0 and ix + 2 * dw < in_width:
            o = np.uint64(iy * in_width + ix) * width + base
            for c in range(channels):
                acc[c] = (flat[o + c] * taps[0, c] + flat[o + d1 + c] * taps[1, c] + flat[o + d2 + c] * taps[2, c]
                          + flat[o + d3 + c] * taps[3, c] + flat[o + d4 + c] * taps[4, c]
                          + flat[o + d5 + c] * taps[5, c] + flat[o + d6 + c] * taps[6, c]
                          + flat[o + d7 + c] * taps[7, c] + flat[o + d8 + c] * taps[8, c])
            for c in range(channels):
                out[j, c] = acc[c]
            continue
        _tap_rows(oy, ox, in_height, in_width, geometry, zero_row, rows)
        if three:  # unrolled: nine loads and multiply-adds per channel, one store
            r0, r1, r2, r3, r4, r5, r6, r7, r8 = rows[0], rows[1], rows[2], rows[3], rows[4], rows[5], rows[6], rows[7], rows[8]
            for c in range(channels):
                k = base + c
                acc[c] = (x[r0, k] * taps[0, c] + x[r1, k] * taps[1, c] + x[r2, k] * taps[2, c]
                          + x[r3, k] * taps[3, c] + x[r4, k] * taps[4, c] + x[r5, k] * taps[5, c]
                          + x[r6, k] * taps[6, c] + x[r7, k] * taps[7, c] + x[r8, k] * taps[8, c])
        else:
            acc[:] = 0.0
            for t in range(taps.shape[0]):
                r = rows[t]
                for c in range(channels):
                    acc[c] += x[r, base + c] * taps[t, c]
        for c in range(channels):
            out[j, c] = acc[c]


RUN = 32  # output positions a depthwise run covers at most: the run's sums stay in L1
RUNS_BELOW_CHANNELS = 16  # depthwise layers with fewer channels use `_depthwise_runs`


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _depthwise_runs(x, in_height, in_width, positions, start, n, out_width, geometry, taps, tiled, rows, out) -> None:
    """out[j] = the depthwise convolution (no bias) at output positions[start + j], for a
    stride-1, undilated kernel on an input that fills its storage.

    Changed positions come in runs along a row (video changes in patches). Where a run's windows
    lie inside the input, tap t reads one contiguous block of the run's length times C values,
    so its products are one flat multiply-add over the block with the taps tiled to its length
    (`tiled`: (kh * kw, RUN * C)): no index arithmetic per position, and full vectors even with
    few channels. Used under RUNS_BELOW_CHANNELS channels, where one position at a time leaves
    vectors part empty; positions near the border go one at a time, as in `_depthwise`.
    """
    channels = out.shape[1]
    kh, kw, top, left = geometry[0], geometry[1], geometry[6], geometry[7]
    flat = x.reshape(x.shape[0] * channels)
    sums = out.reshape(out.shape[0] * channels)
    # A local array for the sums (an argument the compiler cannot tell apart from `x`) and
    # unsigned indices keep the multiply-adds vectorised (scalar otherwise: 2x slower).
    local = np.empty(RUN * channels, np.float32)
    j = 0
    while j < n:
        q = positions[start + j]
        oy = q // out_width
        ox = q - oy * out_width
        iy, ix = oy - top, ox - left
        length = 1
        if 0 <= iy and iy + kh <= in_height and 0 <= ix:
            while (j + length < n and length < RUN and positions[start + j + length] == q + length
                   and ox + length < out_width):
                length += 1
            while length > 0 and ix + length - 1 + kw > in_width:
                length -= 1
        else:
            length = 0
        if length == 0:  # at the border: one position, padding read from the zero row
            _depthwise(x, 0, in_height, in_width, positions, start + j, 1, out_width, geometry, taps, rows, out[j:j + 1])
            j += 1
            continue
        size = np.uint64(length * channels)
        for i in range(size):
            local[i] = 0.0
        t = 0
        for ky in range(kh):
            for kx in range(kw):
                first = np.uint64(((iy + ky) * in_width + ix + kx) * channels)
                tap = tiled[t]
                for i in range(size):
                    local[i] += flat[first + i] * tap[i]
                t += 1
        begin = np.uint64(j * channels)
        for i in range(size):
            sums[begin + i] = local[i]
        j += length


@numba.njit(cache=True, nogil=True, error_model="numpy")
def conv_step(x, x_offset, in_height, in_width, in_changed, in_count, out_value, out_offset, out_width, out_changed,
              out_count, threshold, geometry, kind, weights, bias, mark, found, rows, cols, partial, registers, bits,
              code, params, constants, constant_rows, result, finish, finish_params, tiled) -> None:
    """Recompute the output where its window read a change, run the epilogue, emit.

    weights: (groups, K, M / groups) for the product, or (1, kh * kw, C) taps when depthwise.
    finish: the epilogue's FINISH_KINDS number when `finish_rows` applies it with the bias and the
    filter in one pass (finish_params: its alpha and beta, then PRelu's slope per channel), or -1 to
    run the program `code`.
    tiled: the depthwise taps tiled for `_depthwise_runs`, or (0, 0) where it does not apply.
    """
    n_in = in_count[0]
    if kind == 0:
        positions, n = in_changed, n_in
    else:
        positions = found
        n = mark_window(in_changed, n_in, in_width, geometry, (out_value.shape[0] - 1) // out_width, out_width,
                        mark, found)
        collect_marked(mark, found, n)
    chunk = registers.shape[1]
    groups = weights.shape[0]
    group_out = weights.shape[2]
    group_in = weights.shape[1] // (geometry[0] * geometry[1])
    z = registers[0]
    emitted = 0
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        # The seen values the finish compares with were last touched a frame ago: asked for now,
        # they arrive while the product runs (YOLOX-nano at p = 0.7: 1x1 steps 7% faster).
        prefetch_rows(out_value, out_offset, z.shape[1], positions, start, size)
        if kind == 0:
            gather_rows(x, x_offset, positions, start, size, cols)
            np.dot(cols[:size], weights[0], z[:size])
        elif kind == 1:
            if tiled.shape[1]:
                _depthwise_runs(x, in_height, in_width, positions, start, size, out_width, geometry, weights[0], tiled,
                                rows, z)
            else:
                _depthwise(x, x_offset, in_height, in_width, positions, start, size, out_width, geometry, weights[0], rows, z)
        else:
            for g in range(groups):
                _windows(x, x_offset, in_height, in_width, positions, start, size, out_width, geometry, g * group_in,
                         group_in, rows, cols)
                if groups == 1:
                    np.dot(cols[:size], weights[0], z[:size])
                else:
                    np.dot(cols[:size], weights[g], partial[:size])
                    z[:size, g * group_out:(g + 1) * group_out] = partial[:size]
        if finish >= 0:
            emitted = finish_rows(z, size, bias, finish, finish_params[0], finish_params[1], finish_params[2:],
                                  positions, start, out_value, out_offset, threshold[0], out_changed, emitted)
            continue
        for j in range(size):
            for c in range(z.shape[1]):
                z[j, c] += bias[c]
        run_program(registers, size, positions, start, code, params, constants, constant_rows, bits)
        emitted = emit_rows(registers[result], positions, start, size, out_value, out_offset, threshold[0],
                            out_changed, emitted)
    out_count[0] = emitted


def finish_kind(program, channels: int) -> tuple[int, np.ndarray]:
    """(FINISH_KINDS number, [alpha, beta, slope per channel]) when the epilogue is nothing or one
    activation of the Conv's output (PRelu with a slope uniform over space), which `finish_rows`
    applies in its one pass; else (-1, ...)."""
    params = np.zeros(2 + channels, np.float32)
    if len(program.code) == 0 and program.result == 0:
        return FINISH_KINDS["none"], params
    if len(program.code) == 1:
        op, dst, a, b = (int(v) for v in program.code[0])
        if a != 0 or dst != program.result:
            return -1, params
        if op == OPCODES["PRelu"]:
            row, spatial = program.constant_rows[-1 - b]
            if spatial:
                return -1, params
            params[2:] = program.constants[row]
            return FINISH_KINDS["PRelu"], params
        if op in FINISH_KINDS.values():
            params[:2] = program.params[0]
            return op, params
    return -1, params


def _kernel_weights(weight: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The weights as the kernels read them: (1, kh * kw, C) taps when depthwise, else
    (groups, kh * kw * C/groups, M/groups), rows in the windows' (ky, kx, c) order."""
    m, cg, kh, kw = weight.shape
    g = geometry.groups
    if geometry.kind == DEPTHWISE:
        return np.ascontiguousarray(weight[:, 0].reshape(m, kh * kw).T)[None]
    return np.ascontiguousarray(weight.reshape(g, m // g, cg, kh, kw).transpose(0, 3, 4, 2, 1).reshape(g, kh * kw * cg, m // g))


@register("Conv")
class DeltaConv(DeltaOperator):
    """A 2-D Conv with constant weights; `epilogue` nodes (read only the Conv's output and each
    other's, elementwise) run in the same pass and the output tensor is the epilogue's `result`."""

    @classmethod
    def supports(cls, spec: OpSpec) -> str | None:
        if 1 not in spec.constants:
            return "Conv weights are not constant"
        if len(spec.input_shapes[1]) != 4:
            return "only 2-D convolution has a delta kernel"
        if len(spec.input_shapes) > 2 and spec.input_shapes[2] is not None and 2 not in spec.constants:
            return "Conv bias is not constant"
        return None

    def __init__(self, spec: OpSpec, inputs: list[DeltaTensor | None], outputs: list[DeltaTensor],
                 epilogue: list[ElementwiseNode] = (), head_output: str = "conv", result: str | None = None,
                 buffers=None):
        super().__init__(spec, inputs, outputs, buffers)
        x, out = inputs[0], outputs[0]
        geometry = ConvGeometry(spec)
        weight = np.asarray(spec.constants[1], np.float32)
        m, cg, kh, kw = weight.shape
        g = geometry.groups
        weights = self.buffers.shared(("conv weights", spec.name, geometry.kind), lambda: _kernel_weights(weight, geometry))
        bias = np.zeros(m, np.float32)
        if 2 in spec.constants:
            bias[:] = np.asarray(spec.constants[2], np.float32).reshape(-1)
        program = compile_program(list(epilogue), [head_output], result or head_output, out.layout)
        window = weights.shape[1] if geometry.kind != 1 else 1
        tiled = np.zeros((0, 0), np.float32)
        # Runs pay on few channels only; from 16 on, `_depthwise` one position at a time is as fast
        # or faster (3x3, 20% of positions in patches, in L2, runs / one at a time: 4 channels 12 /
        # 18 ns a position, 8: 13 / 30, 16: 20 / 19, 32: 34 / 27, 64: 64 / 44, 128: 121 / 82).
        runs = (geometry.kind == DEPTHWISE and geometry.strides == (1, 1) and geometry.dilations == (1, 1)
                and x.offset == 0 and x.storage.shape[1] == x.layout.channels and m < RUNS_BELOW_CHANNELS)
        if runs:  # the taps repeated for a run of RUN positions
            tiled = np.ascontiguousarray(np.tile(weights[0], (1, RUN)))
        rows = chunk_rows(4 * max(window, m * program.registers))
        positions = out.layout.positions
        self.geometry = geometry
        self.program = program
        self.finish, finish_params = finish_kind(program, m)
        self.calls = [(conv_step, (
            x.storage, x.offset, x.layout.height, x.layout.width, x.changed, x.count,
            out.storage, out.offset, out.layout.width, out.changed, out.count, out.threshold,
            geometry.as_array(), geometry.kind, weights, bias,
            self.buffers.scratch("mark", (positions,), np.uint8), self.buffers.scratch("found", (positions,), np.int64),
            self.buffers.scratch("taps", (kh * kw,), np.int64),
            self.buffers.scratch("cols", (rows, window), np.float32), self.buffers.scratch("partial", (rows, m // g), np.float32),
            self.buffers.scratch("registers", (program.registers, rows, m), np.float32),
            self.buffers.scratch("bits", (2 * rows * m,), np.int32),
            program.code, program.params, program.constants, program.constant_rows, program.result,
            self.finish, finish_params, tiled,
        ))]
