"""The compiled building blocks against plain numpy references: the filter (`emit_rows`), a dense
value's change (`Entry`), the positions a window's change reaches (`mark_window`), and the
elementwise program's exponential."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deluceva.operators import DeltaTensor, Layout
from deluceva.operators._kernels import _exp, collect_marked, emit_rows, mark_window
from deluceva.runtime.boundaries import Entry

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e30]


def _values(draw, shape, specials: bool) -> np.ndarray:
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(shape).astype(np.float32)
    if specials and values.size:
        flat = values.reshape(-1)
        for _ in range(draw(st.integers(0, 4))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(SPECIAL))
    return values


@st.composite
def emit_cases(draw):
    n, channels = draw(st.integers(0, 12)), draw(st.integers(1, 9))
    positions = np.sort(draw(st.lists(st.integers(0, 39), min_size=n, max_size=n, unique=True))).astype(np.int64)
    seen = _values(draw, (41, channels + 3), specials=False)
    seen[-1] = 0.0
    new = seen[positions, 1:1 + channels].copy()
    # Some rows unchanged, some a little, some a lot, some NaN or infinite.
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0]))
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN: a NaN change, as intended
        new += _values(draw, new.shape, specials=True) * np.float32(scale)
    threshold = draw(st.sampled_from([0.0, 1e-4, 0.5, 3.0]))
    return positions, new, seen, np.float32(threshold)


@SETTINGS
@given(emit_cases())
def test_emit_rows_matches_numpy(case):
    positions, new, seen, threshold = case
    expected_seen = seen.copy()
    change = np.abs(new - seen[positions, 1:1 + new.shape[1]])
    passes = (np.nan_to_num(change, nan=np.inf).max(axis=1, initial=0) > threshold) | np.isnan(change).any(axis=1)
    expected_seen[positions[passes], 1:1 + new.shape[1]] = new[passes]
    changed = np.zeros(40, np.int64)
    rows = np.zeros((max(1, len(positions)), new.shape[1]), np.float32)
    rows[: len(positions)] = new
    count = emit_rows(rows, positions, 0, len(positions), seen, 1, threshold, changed, 0)
    assert list(changed[:count]) == list(positions[passes])
    np.testing.assert_array_equal(seen, expected_seen)  # NaNs compare equal here, in place


@st.composite
def entry_cases(draw):
    channels, height, width = draw(st.integers(1, 4)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
    before = _values(draw, (1, channels, height, width), specials=False)
    after = before + _values(draw, before.shape, specials=False) * draw(st.sampled_from([0.0, 0.01, 1.0]))
    if draw(st.booleans()):
        after.reshape(-1)[draw(st.integers(0, after.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return before, after, np.float32(draw(st.sampled_from([0.0, 0.005, 0.5])))


@SETTINGS
@given(entry_cases(), st.sampled_from([0, 2]))
def test_entry_matches_numpy(case, offset):
    before, after, threshold = case
    _, channels, height, width = before.shape
    tensor = DeltaTensor(Layout(channels, height, width))
    if offset:
        tensor.share_storage(np.zeros((height * width + 1, channels + offset), np.float32), offset)
    entry = Entry(tensor)
    entry.load(before)
    tensor.threshold[0] = threshold
    finite = bool(np.isfinite(after).all())
    assert entry(after) is finite
    if not finite:
        assert tensor.count[0] == 0  # refused: the caller runs a keyframe
        return
    magnitude = np.abs(after - before)[0].max(axis=0).reshape(-1)
    passes = np.flatnonzero(magnitude > threshold)
    assert list(tensor.positions()) == list(passes)
    expected = before.reshape(channels, -1).copy()
    expected[:, passes] = after.reshape(channels, -1)[:, passes]
    np.testing.assert_array_equal(tensor.dense().reshape(channels, -1), expected)


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(0, 3), st.integers(0, 3),
       st.integers(0, 2**31 - 1))
def test_mark_window_matches_brute_force(height, width, kh, kw, sh, sw, dh, dw, top, left, seed):
    out_h = (height + 2 * top - (kh - 1) * dh - 1) // sh + 1
    out_w = (width + 2 * left - (kw - 1) * dw - 1) // sw + 1
    if out_h < 1 or out_w < 1:
        return
    rng = np.random.default_rng(seed)
    changed = np.flatnonzero(rng.random(height * width) < rng.random()).astype(np.int64)
    geometry = np.array([kh, kw, sh, sw, dh, dw, top, left], np.int64)
    mark, found = np.zeros(out_h * out_w, np.uint8), np.zeros(out_h * out_w, np.int64)
    n = mark_window(changed, len(changed), width, geometry, out_h, out_w, mark, found)
    collect_marked(mark, found, n)
    expected = []
    hit = set(changed.tolist())
    for oy in range(out_h):
        for ox in range(out_w):
            reads = {(oy * sh - top + ky * dh) * width + (ox * sw - left + kx * dw)
                     for ky in range(kh) for kx in range(kw)
                     if 0 <= oy * sh - top + ky * dh < height and 0 <= ox * sw - left + kx * dw < width}
            if reads & hit:
                expected.append(oy * out_w + ox)
    assert list(found[:n]) == expected
    assert not mark.any()  # left clean for the next frame


def test_exp_is_accurate_and_keeps_nan():
    x = np.concatenate([np.linspace(-100, 100, 20001), [np.nan, np.inf, -np.inf, 0.0]]).astype(np.float32)
    out = x.copy()
    _exp(out, len(out), np.zeros(len(out), np.int32))
    reference = np.exp(np.clip(x.astype(np.float64), -87, 87))
    finite = np.isfinite(x)
    assert np.max(np.abs(out[finite] - reference[finite]) / reference[finite]) < 3e-7
    assert np.isnan(out[-4])
    assert out[-3] == pytest.approx(np.exp(87.0), rel=1e-6) and out[-2] == pytest.approx(np.exp(-87.0), rel=1e-6)


def test_same_values_compares_bits():
    from deluceva.runtime.boundaries import same_values

    a = np.random.default_rng(0).standard_normal((1, 3, 70, 90)).astype(np.float32)
    b = a.copy()
    assert same_values(a, b)
    b.reshape(-1)[-1] += 1e-7  # the last value: past every block
    assert not same_values(a, b)
    a.reshape(-1)[5] = b.reshape(-1)[5] = np.nan
    b.reshape(-1)[-1] = a.reshape(-1)[-1]
    assert same_values(a, b)  # the same NaN is the same value
    b.reshape(-1)[7] = -b.reshape(-1)[7] if a.reshape(-1)[7] == 0 else b.reshape(-1)[7]
    c = np.zeros(4, np.float32)
    assert not same_values(c, -c)  # -0 is another value: onnxruntime may tell them apart


def test_exceeds_finds_a_change_over_the_threshold_anywhere():
    from deluceva.runtime.boundaries import exceeds

    a = np.random.default_rng(1).standard_normal((1, 3, 40, 50)).astype(np.float32)
    b = a + np.float32(0.01)
    assert not exceeds(a, b, 0.02)
    assert exceeds(a, b, 0.005)
    c = b.copy()
    c[0, 2, 39, 49] += 1.0  # the very last value
    assert exceeds(c, b, 0.5) and not exceeds(c, b, 2.0)
    c[0, 0, 0, 0] = np.inf
    assert exceeds(c, b, 2.0)  # not finite: the frame must run (and fail as onnxruntime does)
