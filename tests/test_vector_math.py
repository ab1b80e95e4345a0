"""The epilogue's transcendental functions (`operators/_kernels.py`), vectorised float32 code,
against float64 references: relative error over the whole float range in use, values near 0
where a naive formula cancels, and NaN and +-inf exactly where float64 puts them."""

from __future__ import annotations

import numpy as np
import pytest

from deluceva.operators._kernels import OPCODES, _unary

# Dense near 0 and near the ends of the clamped range, plus specials.
POINTS = np.concatenate([
    np.linspace(-100, 100, 40001), np.geomspace(1e-30, 1e-3, 200), -np.geomspace(1e-30, 1e-3, 200),
    np.linspace(-1, 1, 4001), np.linspace(-90, -80, 1001), np.linspace(80, 90, 1001), [0.0, -0.0, 1e30, -1e30],
]).astype(np.float32)
SPECIALS = np.array([np.nan, np.inf, -np.inf], np.float32)


def reference(op: str, x: np.ndarray, alpha: float) -> np.ndarray:
    x = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if op == "Tanh":
            return np.tanh(x)
        if op == "Elu":
            return np.where(x > 0, x, alpha * np.expm1(x))
        if op == "Softplus":
            return np.logaddexp(0, x)
        sigmoid = 1 / (1 + np.exp(-np.clip(x, -87, 87)))
        return x * sigmoid if op == "SiLU" else sigmoid
    raise AssertionError(op)


def run(op: str, x: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    out = x.copy()
    _unary(OPCODES[op], out, len(out), np.float32(alpha), np.float32(0), np.zeros(2 * len(out), np.int32))
    return out


@pytest.mark.parametrize("op", ["Tanh", "Elu", "Softplus", "Sigmoid", "SiLU"])
def test_relative_error_against_float64(op):
    got, want = run(op, POINTS), reference(op, POINTS, 0.7)
    assert np.isfinite(got).all()
    tiny = np.abs(want) < 1e-37  # below float32's normal range: an absolute bound instead
    relative = np.abs(got[~tiny] - want[~tiny]) / np.abs(want[~tiny])
    assert relative.max() < 4e-7, POINTS[~tiny][np.argmax(relative)]
    assert np.abs(got[tiny] - want[tiny]).max() < 1e-37


@pytest.mark.parametrize("op", ["Tanh", "Elu", "Softplus", "Sigmoid", "SiLU"])
def test_nan_and_infinities_exact(op):
    got, want = run(op, SPECIALS), reference(op, SPECIALS, 0.7)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:], want[1:].astype(np.float32))


def test_odd_and_sign_preserving_near_zero():
    x = np.geomspace(1e-20, 0.6, 500).astype(np.float32)
    np.testing.assert_array_equal(run("Tanh", -x), -run("Tanh", x))
    assert (run("Elu", -x) < 0).all() and (run("Softplus", -x) > 0).all()


@pytest.mark.parametrize("n", [1, 7, 16, 33])
def test_short_and_odd_lengths_touch_only_n_values(n):
    x = np.linspace(-3, 3, 40).astype(np.float32)
    out = x.copy()
    _unary(OPCODES["Tanh"], out, n, np.float32(0), np.float32(0), np.zeros(2 * n, np.int32))
    np.testing.assert_allclose(out[:n], np.tanh(x[:n].astype(np.float64)), rtol=4e-7)
    np.testing.assert_array_equal(out[n:], x[n:])
