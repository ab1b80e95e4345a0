"""Compiled (numba) building blocks that the delta operators' kernels share.

- `emit_rows`: the filter. Compares recomputed rows with the seen ones and writes and lists those
  whose largest change exceeds the output's threshold (or is NaN), in one pass.
- `mark_window`, `collect_marked`: the output positions whose window reads a changed input.
- `run_program`: the elementwise epilogue (activations, arithmetic with constants, channel
  softmax) as a short list of instructions over registers of rows; see `operators/program.py`.
- `finish_rows`: a Conv's bias, its epilogue when that is one common activation, and the filter,
  in one pass per row while the row is in cache (`run_program` then `emit_rows` make five
  passes over a chunk: on a 1x1 64->64 layer with SiLU they cost as much as the product).
- `prefetch_rows`: asks for rows to be brought into cache ahead of their use.

Every kernel works on preallocated buffers: none allocates more than a few rows of local scratch.

Two rules keep the inner loops vectorised (each measured at 3-4x): a column index that adds an
offset is unsigned (`np.uint64`), because numba checks signed indices for wraparound on every
access; and a loop that writes one array while reading another of the same type writes a
local array (or works in place), because the compiler cannot rule out that they overlap.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

__all__ = ["emit_rows", "mark_window", "collect_marked", "gather_rows", "load_rows", "run_program", "OPCODES",
           "finish_rows", "FINISH_KINDS", "prefetch_rows"]

_F32 = np.float32


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (no conversion: a register reinterpreted)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return numba.types.float32(numba.types.int32), codegen


@intrinsic
def _bits_of_float(typingctx, value):
    """The int32 bit pattern of the float32 `value`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return numba.types.int32(numba.types.float32), codegen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def emit_rows(new, positions, start, n, value, offset, threshold, changed, count) -> int:
    """Emit rows new[:n] for positions[start:start + n]; returns the new count of `changed`.

    The output's seen value at p is value[p, offset:offset + C]. A row passes when its largest
    absolute change exceeds `threshold`, or when a change is NaN (so a NaN reaches the output as
    onnxruntime's would); a passing row is copied in and p appended to changed[count:].

    The largest change is taken over the changes' float32 bit patterns: with the sign bit
    cleared, integer order is float order with NaN above infinity, and an integer maximum
    vectorises where a float one (which must mind NaN) does not.
    """
    width = np.uint64(new.shape[1])
    base = np.uint64(offset)
    limit_bits = _bits_of_float(_F32(threshold))
    for j in range(n):
        p = positions[start + j]
        biggest = np.int32(0)
        for c in range(width):
            biggest = max(biggest, _bits_of_float(abs(new[j, c] - value[p, base + c])))
        if biggest > limit_bits:
            for c in range(width):
                value[p, base + c] = new[j, c]
            changed[count] = p
            count += 1
    return count


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def window_geometry(geometry):
    """(kh, kw, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left): a window's
    geometry array (`ConvGeometry.as_array()`, pools' alike) as eight integers."""
    return (geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6],
            geometry[7])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def mark_window(changed, n, in_width, geometry, out_height, out_width, mark, found) -> int:
    """List, once each, the output positions whose window reads one of changed[:n].

    `geometry` is (kh, kw, stride_h, stride_w, dilation_h, dilation_w, pad_top, pad_left):
    output (oy, ox) reads input rows oy*stride_h - pad_top + ky*dilation_h, ky < kh (and
    columns alike). Marks listed positions in `mark` (clear it with `collect_marked`).
    """
    kh, kw, sh, sw, dh, dw, top, left = window_geometry(geometry)
    k = 0
    unit = sh == 1 and sw == 1  # no division: the common case, and 3x faster
    for j in range(n):
        p = changed[j]
        iy = p // in_width
        ix = p - iy * in_width
        for ky in range(kh):
            t = iy + top - ky * dh
            if t < 0:
                break
            if unit:
                oy = t
            elif t % sh:
                continue
            else:
                oy = t // sh
            if oy >= out_height:
                continue
            for kx in range(kw):
                u = ix + left - kx * dw
                if u < 0:
                    break
                if unit:
                    ox = u
                elif u % sw:
                    continue
                else:
                    ox = u // sw
                if ox >= out_width:
                    continue
                q = oy * out_width + ox
                if mark[q] == 0:
                    mark[q] = 1
                    found[k] = q
                    k += 1
    return k


@numba.njit(cache=True, nogil=True, error_model="numpy")
def collect_marked(mark, found, n) -> None:
    """Sort found[:n] (the marked positions) ascending and clear their marks.

    Past a few marks per thousand positions, the marks are read off the mark array in order
    instead of sorted, eight at a time: a word of eight unmarked positions is one compare (a
    pass over 940k positions with 1% marked: 0.8 ms a byte at a time, 1 ms sorting the list).
    """
    total = mark.shape[0]
    if n * 256 <= total:
        found[:n].sort()
        for j in range(n):
            mark[found[j]] = 0
        return
    words = total // 8
    packed = mark[: words * 8].view(np.uint64)
    k = 0
    for w in range(words):
        if packed[w]:
            for q in range(8 * w, 8 * w + 8):
                if mark[q]:
                    found[k] = q
                    k += 1
            packed[w] = 0
    for q in range(words * 8, total):
        if mark[q]:
            mark[q] = 0
            found[k] = q
            k += 1


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask for the cache line holding array.flat[index] (a C-contiguous array) to be brought into
    cache, without waiting for it."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        structure = context.make_array(array_type)(context, builder, args[0])
        address = builder.gep(structure.data, [args[1]])
        address = builder.bitcast(address, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function = builder.module.declare_intrinsic("llvm.prefetch", [address.type],
                                                    ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        builder.call(function, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return numba.types.none(array, numba.types.intp), codegen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def prefetch_rows(value, offset, channels, positions, start, n) -> None:
    """Ask for rows value[positions[start + j], offset:offset + channels], j < n, to be brought
    into cache, without waiting for them (a hint: nothing is read or written)."""
    width = value.shape[1]
    for j in range(n):
        first = positions[start + j] * width + offset
        for at in range(first, first + channels, 16):  # 16 floats: a 64-byte cache line
            _prefetch(value, at)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def gather_rows(source, offset, positions, start, n, out) -> None:
    """out[j] = source[positions[start + j], offset:offset + C] for j < n (C = out's width)."""
    channels = np.uint64(out.shape[1])
    base = np.uint64(offset)
    for j in range(n):
        p = positions[start + j]
        for c in range(channels):
            out[j, c] = source[p, base + c]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def load_rows(x, value, offset) -> None:
    """value[p, offset + c] = x[c, p]: a dense (C, P) value into channels-last rows (a keyframe
    loads every delta tensor this way: 0.2 ns a value, against 0.3-0.8 for numpy's copy)."""
    channels, positions = x.shape
    base = np.uint64(offset)
    for p in range(positions):
        for c in range(channels):
            value[p, base + np.uint64(c)] = x[c, p]


# -- transcendental functions, vectorised ------------------------------------------------------
#
# numba from PyPI has no vector math library: math.exp, math.tanh and friends are scalar calls that
# keep a loop from vectorising (libm's expf per value: 3x the time of `_exp`). These build each
# function from float32 arithmetic the compiler vectorises, in place on a[:n] with int32 scratch
# for the exponent bits; NaN stays NaN, +-inf go where float64 sends them. Coefficients: fitted
# for relative error (Lawson's weighted least squares) on the reduced ranges named.
# Contraction into FMAs (the only fast-math flag used) rounds once where mul + add rounds twice.

_CONTRACT = {"contract"}
_LOG2E = _F32(1.4426950408889634)
_LN2_HIGH = _F32(0.693359375)  # ln 2 in two parts: k * _LN2_HIGH is exact for |k| < 256
_LN2_LOW = _F32(-2.12194440e-4)
_SHIFTER = _F32(12582912.0)  # 1.5 * 2^23: adding then subtracting it rounds |x| < 2^22 to a whole number
# exp(r) on |r| <= ln2 / 2, degree 5: relative error 7.5e-8 (float32 evaluation: 2.1e-7)
_E0, _E1, _E2, _E3, _E4, _E5 = (_F32(1.00000007164801), _F32(0.999999691992791), _F32(0.4999889491830642),
                                _F32(0.1666757479059861), _F32(0.04191537457185625), _F32(0.00829764667039168))
# (expm1(r) / r - 1) / r on |r| <= ln2 / 2, degree 4: relative error of expm1 1.3e-8
_M1, _M2, _M3, _M4, _M5 = (_F32(0.4999999815520204), _F32(0.16666543678313755), _F32(0.04166719968345543),
                           _F32(0.00836651285802098), _F32(0.00138825165858656))
# (tanh(x) - x) / x^3 in x^2 on |x| <= 0.5, degree 3: relative error of tanh 1.5e-8
_TANH_SMALL = _F32(0.5)
_T3, _T5, _T7, _T9 = (_F32(-0.33333143900814394), _F32(0.13325879086783973), _F32(-0.05304550443616055),
                      _F32(0.01724151518364183))


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _reduce(t):
    """(k, r) with t = k ln2 + r, k a whole number (as a float), |r| <= ln2 / 2; t finite."""
    k = (t * _LOG2E + _SHIFTER) - _SHIFTER
    return k, t - k * _LN2_HIGH - k * _LN2_LOW


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _exp_parts(t):
    """(exp(r), the int32 bits of 2^k) with exp(t) = their product; t finite in [-87, 87]."""
    k, r = _reduce(t)
    return (_E0 + r * (_E1 + r * (_E2 + r * (_E3 + r * (_E4 + r * _E5))))), (np.int32(k) + np.int32(127)) << 23


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _exp(a, n, bits) -> None:
    """a[:n] = exp(a[:n]) in place (relative error 2.1e-7); the argument is clamped to [-87, 87],
    where float32's exp stays finite and normal. `bits`: n int32 scratch. In place, because with
    two arrays that may be one the compiler gives up vectorising (15x slower)."""
    for i in range(n):
        v = a[i]
        known = v == v
        p, bits[i] = _exp_parts(min(max(v, _F32(-87.0)), _F32(87.0)) if known else _F32(0.0))
        a[i] = p if known else v
    scale = bits[:n].view(np.float32)
    for i in range(n):
        a[i] = a[i] * scale[i]


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _tanh(a, n, bits, poly) -> None:
    """a[:n] = tanh(a[:n]) in place: (1 - e) / (1 + e) with e = exp(-2|a|), and an odd
    polynomial below |a| = 0.5, where 1 - e would lose the relative precision; relative error
    <= 3e-7. `bits`, `poly`: n-value scratch."""
    for i in range(n):
        v = a[i]
        t = max(_F32(-2.0) * abs(v), _F32(-87.0)) if v == v else _F32(0.0)
        poly[i], bits[i] = _exp_parts(t)
    scale = bits[:n].view(np.float32)
    for i in range(n):
        v = a[i]
        x = abs(v)
        e = poly[i] * scale[i]
        s = x * x
        small = x + x * s * (_T3 + s * (_T5 + s * (_T7 + s * _T9)))
        m = small if x < _TANH_SMALL else (_F32(1.0) - e) / (_F32(1.0) + e)
        a[i] = math.copysign(m, v) if v == v else v


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _elu(a, n, alpha, bits, poly) -> None:
    """a[:n] = a if a > 0 else alpha * expm1(a), in place. expm1(t) = 2^k expm1(r) + (2^k - 1),
    with expm1(r) = r (1 + r q(r)): relative precision near 0, where exp(t) - 1 would lose it;
    relative error <= 1.5e-7. `bits`, `poly`: n-value scratch."""
    for i in range(n):
        v = a[i]
        t = min(max(v, _F32(-87.0)), _F32(0.0)) if v == v else _F32(0.0)
        k, r = _reduce(t)
        poly[i] = r + r * r * (_M1 + r * (_M2 + r * (_M3 + r * (_M4 + r * _M5))))
        bits[i] = (np.int32(k) + np.int32(127)) << 23
    scale = bits[:n].view(np.float32)
    for i in range(n):
        v = a[i]
        two_k = scale[i]
        a[i] = v if (v > 0 or v != v) else alpha * (two_k * poly[i] + (two_k - _F32(1.0)))


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _softplus(a, n, bits, poly) -> None:
    """a[:n] = log(1 + exp(a)) in place: max(a, 0) + log1p(y), y = exp(-|a|) in (0, 1], and
    log1p(y) = 2 atanh(z), z = y / (2 + y) <= 1/3, by its series to z^15 (truncation < 1.5e-9
    relative); relative error <= 3e-7. `bits`, `poly`: n-value scratch."""
    for i in range(n):
        v = a[i]
        t = max(-abs(v), _F32(-87.0)) if v == v else _F32(0.0)
        poly[i], bits[i] = _exp_parts(t)
    scale = bits[:n].view(np.float32)
    for i in range(n):
        v = a[i]
        y = poly[i] * scale[i] if abs(v) <= _F32(87.0) else _F32(0.0)
        z = y / (_F32(2.0) + y)
        w = z * z
        log1p = _F32(2.0) * z * (_F32(1.0) + w * (_F32(1 / 3) + w * (_F32(1 / 5) + w * (_F32(1 / 7) + w * (
            _F32(1 / 9) + w * (_F32(1 / 11) + w * (_F32(1 / 13) + w * _F32(1 / 15))))))))
        a[i] = max(v, _F32(0.0)) + log1p  # max(NaN, 0) is NaN


# -- a Conv's rows finished in one pass ------------------------------------------------------

# Epilogues `finish_rows` applies itself: no epilogue, or one activation of the Conv's output.
# Each is its instruction's opcode (OPCODES; "none" is Copy, the identity).
FINISH_KINDS = {"none": 13, "SiLU": 14, "Sigmoid": 3, "Relu": 0, "LeakyRelu": 1, "Clip": 2, "HardSwish": 5, "PRelu": 24}


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def _logistic(a, n, silu, kbits, poly) -> None:
    """a[:n] = sigmoid(a), or a * sigmoid(a) when `silu`, in place; NaN stays NaN.

    exp(-a) as in `_exp`; `kbits` and `poly`: n-value scratch. 0.46 ns a value here (AVX2 code),
    against 0.70 with a degree-7 polynomial, four passes and no FMA contraction (and 0.33 for
    onnxruntime's QuickGelu in YOLOX-nano). Relative error <= 2.6e-7 against float64.
    """
    for i in range(n):
        v = a[i]
        t = min(max(-v, _F32(-87.0)), _F32(87.0)) if v == v else _F32(0.0)
        poly[i], kbits[i] = _exp_parts(t)
    scale = kbits[:n].view(np.float32)
    if silu:
        for i in range(n):
            a[i] = a[i] / (_F32(1.0) + poly[i] * scale[i])
    else:
        for i in range(n):
            v = a[i]
            a[i] = _F32(1.0) / (_F32(1.0) + poly[i] * scale[i]) if v == v else v


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _activation(v, kind, alpha, beta, slope):
    """The FINISH_KINDS activation `kind` of one value, as `_unary` computes it (same operations,
    same results). Called with a constant `kind` inside a loop, it folds to that one branch and the
    loop vectorises; with a variable one, the branches stay in the loop and it does not (2-3x)."""
    if kind == 14 or kind == 3:  # SiLU, Sigmoid: exp(-v) as in `_exp`
        t = min(max(-v, _F32(-87.0)), _F32(87.0)) if v == v else _F32(0.0)
        poly, scale = _exp_parts(t)
        denominator = _F32(1.0) + poly * _float_from_bits(scale)
        if kind == 14:
            return v / denominator
        return _F32(1.0) / denominator if v == v else v
    if kind == 0:
        return max(v, _F32(0.0)) if v == v else v
    if kind == 1:
        return v if v >= 0 else v * alpha
    if kind == 2:
        return min(max(v, alpha), beta) if v == v else v
    if kind == 5:
        h = v / _F32(6.0) + _F32(0.5)
        return v * (min(max(h, _F32(0.0)), _F32(1.0)) if h == h else h)
    if kind == 24:
        return v if v >= 0 else v * slope
    return v


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT, inline="always")
def _activate_row(z, j, bias, kind, alpha, beta, slopes, row) -> None:
    """row = the activation `kind` of z[j] + bias (`kind` a constant at each call: see `_activation`)."""
    for c in range(np.uint64(z.shape[1])):
        row[c] = _activation(z[j, c] + bias[c], kind, alpha, beta, slopes[c])


@numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=_CONTRACT)
def finish_rows(z, n, bias, kind, alpha, beta, slopes, positions, start, value, offset, threshold, changed,
                count) -> int:
    """For each row z[j], j < n (output position positions[start + j]): add the bias, apply the
    epilogue `kind` (FINISH_KINDS; alpha, beta: LeakyRelu's slope, Clip's bounds; slopes: PRelu's
    per channel), and emit it as `emit_rows` does; returns the new count of `changed`.

    One row at a time, in two loops over its channels while it is in L1: the bias and the
    activation into a local row, then the change against the seen value, whose largest is taken
    over bit patterns as in `emit_rows`. Each kind has its own first loop, with the kind a
    constant in it (see `_activation`). 448 rows of 64 channels (YOLOX-nano's 1x1 layer at 15% of
    positions): SiLU 0.72 ns a value, no activation 0.36-0.44, where the earlier form (blocks of
    32 rows, the bias, each pass of the activation and the compare over the block in turn) took
    0.98-1.16 and 0.45-0.47, with the same results to the bit.
    """
    m = z.shape[1]
    width = np.uint64(m)
    base = np.uint64(offset)
    limit_bits = _bits_of_float(_F32(threshold))
    row = np.empty(m, np.float32)  # local: the compiler knows it overlaps nothing (see the module doc)
    for j in range(n):
        if kind == 14:
            _activate_row(z, j, bias, 14, alpha, beta, slopes, row)
        elif kind == 3:
            _activate_row(z, j, bias, 3, alpha, beta, slopes, row)
        elif kind == 0:
            _activate_row(z, j, bias, 0, alpha, beta, slopes, row)
        elif kind == 1:
            _activate_row(z, j, bias, 1, alpha, beta, slopes, row)
        elif kind == 2:
            _activate_row(z, j, bias, 2, alpha, beta, slopes, row)
        elif kind == 5:
            _activate_row(z, j, bias, 5, alpha, beta, slopes, row)
        elif kind == 24:
            _activate_row(z, j, bias, 24, alpha, beta, slopes, row)
        else:  # "none"
            _activate_row(z, j, bias, 13, alpha, beta, slopes, row)
        p = positions[start + j]
        biggest = np.int32(0)
        for c in range(width):
            biggest = max(biggest, _bits_of_float(abs(row[c] - value[p, base + c])))
        if biggest > limit_bits:
            for c in range(width):
                value[p, base + c] = row[c]
            changed[count] = p
            count += 1
    return count


# -- the elementwise program ----------------------------------------------------------------

# Unary instructions: dst = f(a); binary: dst = f(a, b). An operand >= 0 is a register; an
# operand k < 0 is constant -1 - k, a row per channel (uniform over space) or per position.
OPCODES = {
    "Relu": 0, "LeakyRelu": 1, "Clip": 2, "Sigmoid": 3, "HardSigmoid": 4, "HardSwish": 5, "Tanh": 6,
    "Elu": 7, "Softplus": 8, "Softsign": 9, "Abs": 10, "Neg": 11, "Softmax": 12, "Copy": 13, "SiLU": 14,
    "Add": 20, "Sub": 21, "Mul": 22, "Div": 23, "PRelu": 24,
}

@numba.njit(cache=True, nogil=True, error_model="numpy")
def _unary(op, a, n, alpha, beta, bits) -> None:
    """a[:n] = op(a[:n]) in place (in place so that every loop vectorises; see `_exp`)."""
    if op == 0:
        for i in range(n):
            a[i] = max(a[i], _F32(0.0)) if a[i] == a[i] else a[i]
    elif op == 1:
        for i in range(n):
            a[i] = a[i] if a[i] >= 0 else a[i] * alpha
    elif op == 2:
        for i in range(n):
            a[i] = min(max(a[i], alpha), beta) if a[i] == a[i] else a[i]
    elif op == 3 or op == 14:
        _logistic(a, n, op == 14, bits[:n], bits[n: 2 * n].view(np.float32))
    elif op == 4:
        for i in range(n):
            v = a[i] * alpha + beta
            a[i] = min(max(v, _F32(0.0)), _F32(1.0)) if v == v else v
    elif op == 5:
        for i in range(n):
            v = a[i] / _F32(6.0) + _F32(0.5)
            a[i] = a[i] * (min(max(v, _F32(0.0)), _F32(1.0)) if v == v else v)
    elif op == 6:
        _tanh(a, n, bits[:n], bits[n: 2 * n].view(np.float32))
    elif op == 7:
        _elu(a, n, alpha, bits[:n], bits[n: 2 * n].view(np.float32))
    elif op == 8:
        _softplus(a, n, bits[:n], bits[n: 2 * n].view(np.float32))
    elif op == 9:
        for i in range(n):
            a[i] = a[i] / (_F32(1.0) + abs(a[i]))
    elif op == 10:
        for i in range(n):
            a[i] = abs(a[i])
    elif op == 11:
        for i in range(n):
            a[i] = -a[i]


@numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _apply(op, a, b):
    """op(a, b) for a binary opcode."""
    if op == 20:
        return a + b
    if op == 21:
        return a - b
    if op == 22:
        return a * b
    if op == 23:
        return a / b
    return a if a >= 0 else a * b  # PRelu


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _binary(op, registers, dst, a, b, n, positions, start, constants, constant_rows) -> None:
    """registers[dst, :n] = op(operand a, operand b), each a register or a constant."""
    m = registers.shape[2]
    if a >= 0 and b >= 0:
        for j in range(n):
            for c in range(m):
                registers[dst, j, c] = _apply(op, registers[a, j, c], registers[b, j, c])
        return
    for j in range(n):
        p = positions[start + j]
        if a >= 0:
            row = constant_rows[-1 - b, 0] + (p if constant_rows[-1 - b, 1] else 0)
            for c in range(m):
                registers[dst, j, c] = _apply(op, registers[a, j, c], constants[row, c])
        elif b >= 0:
            row = constant_rows[-1 - a, 0] + (p if constant_rows[-1 - a, 1] else 0)
            for c in range(m):
                registers[dst, j, c] = _apply(op, constants[row, c], registers[b, j, c])
        else:
            left = constant_rows[-1 - a, 0] + (p if constant_rows[-1 - a, 1] else 0)
            right = constant_rows[-1 - b, 0] + (p if constant_rows[-1 - b, 1] else 0)
            for c in range(m):
                registers[dst, j, c] = _apply(op, constants[left, c], constants[right, c])


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _softmax_rows(x, n, bits) -> None:
    """x[j] = softmax over the channels of x[j], for j < n, in place."""
    m = x.shape[1]
    for j in range(n):
        top = x[j, 0]
        for c in range(1, m):
            top = max(top, x[j, c])
        for c in range(m):
            x[j, c] = x[j, c] - top
    _exp(x[:n].reshape(n * m), n * m, bits)
    for j in range(n):
        total = _F32(0.0)
        for c in range(m):
            total += x[j, c]
        for c in range(m):
            x[j, c] = x[j, c] / total


@numba.njit(cache=True, nogil=True, error_model="numpy")
def run_program(registers, n, positions, start, code, params, constants, constant_rows, bits) -> None:
    """Run the instructions `code` on rows registers[:, :n] (those of positions[start:start+n]).

    code[i] = (opcode, destination, a, b); params[i] = (alpha, beta); a constant operand's rows
    start at constant_rows[k, 0] in `constants`, one row for all positions unless
    constant_rows[k, 1] (then one row per position). `bits` is scratch of 2 * n * channels int32.
    """
    m = registers.shape[2]
    for i in range(code.shape[0]):
        op, dst, a, b = code[i, 0], code[i, 1], code[i, 2], code[i, 3]
        alpha, beta = params[i, 0], params[i, 1]
        if op < 20:
            if dst != a:
                registers[dst, :n] = registers[a, :n]
            if op == 12:
                _softmax_rows(registers[dst], n, bits)
            elif op != 13:
                _unary(op, registers[dst, :n].reshape(n * m), n * m, alpha, beta, bits)
            continue
        _binary(op, registers, dst, a, b, n, positions, start, constants, constant_rows)
