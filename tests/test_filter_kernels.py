"""The compiled Filter against a plain numpy reference: same emitted tiles, bit for bit.

The reference is the numpy Filter as it was before the kernels (commit fc7b59d);
it is copied here, not imported, so that a change to the runtime cannot change it too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from deluceva.operators import Delta, Grid
from deluceva.runtime.boundaries import Filter, ToDelta


def reference_magnitudes(values: np.ndarray) -> np.ndarray:
    if len(values) == 0:
        return np.zeros(0, values.dtype)
    return np.abs(values.reshape(len(values), -1)).max(axis=1)


def reference_threshold(magnitudes: np.ndarray, percentage: float) -> float:
    if percentage <= 0:
        return 0.0
    candidates = magnitudes[magnitudes > 0]
    if len(candidates) == 0:
        return 0.0
    rank = int(percentage * (len(candidates) - 1))
    return float(np.partition(candidates, rank)[rank])


class ReferenceFilter:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.pending = None
        self.magnitude = None

    def __call__(self, delta: Delta, percentage: float) -> Delta:
        if self.pending is None:
            if percentage <= 0:
                keep = reference_magnitudes(delta.values) > 0
                if keep.all():
                    return delta
                return Delta(self.grid, delta.index[keep], delta.values[keep])
            g = self.grid
            self.pending = np.zeros((g.n_tiles, g.channels, g.tile, g.tile), np.float32)
            self.magnitude = np.zeros(g.n_tiles, np.float32)
        threshold = reference_threshold(reference_magnitudes(delta.values), percentage)
        if len(delta.index):
            updated = self.pending[delta.index] + delta.values
            self.pending[delta.index] = updated
            self.magnitude[delta.index] = reference_magnitudes(updated)
        emitted = np.flatnonzero(self.magnitude > threshold)
        values = self.pending[emitted]
        self.pending[emitted] = 0
        self.magnitude[emitted] = 0
        return Delta(self.grid, emitted, values)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# Exact zeros of both signs, values whose sums cancel, tiny and huge magnitudes, and (rarely
# useful, but part of "every input") NaN and infinities.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 2.5, -2.5, 1e-40, -1e-40, 3e38, -3e38, np.inf, -np.inf, np.nan]
ELEMENTS = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(-4, 4, width=32),
    st.sampled_from([0.0, 0.0, 1.0, -1.0]),
)
PERCENTAGES = st.one_of(st.sampled_from([0.0, -0.0, -0.5, 1e-9, 0.25, 0.5, 0.999, 1.0]), st.floats(0, 1))


@st.composite
def frames(draw, nan=True):
    grid = Grid(
        channels=draw(st.integers(1, 4)),
        height=draw(st.integers(1, 9)),
        width=draw(st.integers(1, 9)),
        tile=draw(st.integers(1, 4)),
    )
    elements = ELEMENTS if nan else ELEMENTS.filter(lambda v: not np.isnan(v))
    sequence = []
    for _ in range(draw(st.integers(1, 6))):
        if sequence and draw(st.booleans()):
            # Take back (some of) the last change: held-back tiles shrink, or cancel exactly.
            last = sequence[-1][0]
            scale = draw(st.sampled_from([-1.0, -0.5, -0.25]))
            index, values = last.index, (last.values * np.float32(scale)).astype(np.float32)
        else:
            chosen = draw(st.sets(st.integers(0, grid.n_tiles - 1)))
            index = np.array(sorted(chosen), np.int64)
            shape = (len(index), grid.channels, grid.tile, grid.tile)
            values = draw(arrays(np.float32, shape, elements=elements))
        zero = draw(arrays(np.bool_, len(index)))
        values[zero] = 0
        sequence.append((Delta(grid, index, values), draw(PERCENTAGES)))
    return grid, sequence


def copy_delta(delta: Delta) -> Delta:
    return Delta(delta.grid, delta.index.copy(), delta.values.copy())


def check_same(grid: Grid, sequence: list[tuple[Delta, float]]) -> None:
    reference, compiled = ReferenceFilter(grid), Filter(grid)

    def numpy_path(delta, percentage):
        raise AssertionError("a well-formed delta took the numpy path")

    compiled._call_numpy = numpy_path
    for frame, (delta, percentage) in enumerate(sequence):
        given_ref, given_new = copy_delta(delta), copy_delta(delta)
        with np.errstate(all="ignore"):  # the reference warns on overflow to inf
            expected = reference(given_ref, percentage)
        got = compiled(given_new, percentage)
        assert (expected is given_ref) == (got is given_new), f"frame {frame}: passed through in one only"
        assert same_bits(expected.index, got.index), f"frame {frame}: emitted {got.index}, expected {expected.index}"
        assert same_bits(expected.values, got.values), f"frame {frame}: emitted values differ"
        assert same_bits(given_new.values, delta.values) and same_bits(given_new.index, delta.index)
        assert (reference.pending is None) == (compiled.pending is None)
        if reference.pending is not None:
            assert same_bits(reference.pending, compiled.pending), f"frame {frame}: pending differs"
            # A NaN magnitude is never compared true, whichever NaN it is.
            assert np.array_equal(reference.magnitude, compiled.magnitude, equal_nan=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_filter_matches_numpy_reference(case):
    check_same(*case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames(nan=False))
def test_filter_matches_numpy_reference_without_nan(case):
    check_same(*case)


def test_filter_matches_on_realistic_frames():
    """Larger grids, a share of the tiles changing, p switching between 0 and > 0."""
    rng = np.random.default_rng(7)
    for grid in (Grid(16, 52, 52, 4), Grid(64, 13, 13, 1), Grid(32, 26, 26, 2)):
        sequence = []
        for frame in range(12):
            n = int(rng.uniform(0.1, 0.5) * grid.n_tiles)
            index = np.sort(rng.choice(grid.n_tiles, n, replace=False)).astype(np.int64)
            values = rng.standard_normal((n, grid.channels, grid.tile, grid.tile)) * rng.exponential(1, (n, 1, 1, 1))
            values = values.astype(np.float32)
            values[rng.random(n) < 0.1] = 0
            if frame % 3 == 2:  # take back half the last change
                index, values = sequence[-1][0].index, sequence[-1][0].values * np.float32(-0.5)
            percentage = [0.0, 0.0, 0.3, 0.3, 0.7, 0.0, 0.05, 0.999, 0.3, 0.0, 0.5, 0.2][frame]
            sequence.append((Delta(grid, index, values), percentage))
        check_same(grid, sequence)


@pytest.mark.parametrize(
    "index, percentage",
    [
        ([3, 1], 0.5),  # not ascending
        ([1, 1], 0.5),  # repeated: numpy's last write wins
        ([-1, 2], 0.5),  # negative: numpy counts from the end
        ([0, 99], 0.5),  # beyond the grid: numpy raises
        ([0, 2], 1.5),  # rank beyond the candidates: numpy raises
        ([0, 2], float("nan")),
        ([0, 2], float("inf")),
    ],
)
def test_filter_off_contract_input_behaves_as_numpy(index, percentage):
    grid = Grid(2, 6, 6, 2)
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):
        reference, compiled = ReferenceFilter(grid), Filter(grid)
        for p in (0.3, percentage):
            values = rng.standard_normal((len(index), 2, 2, 2)).astype(dtype)
            delta = Delta(grid, np.array(index, np.int64), values)
            outcomes = []
            for f in (reference, compiled):
                try:
                    with np.errstate(all="ignore"):
                        out = f(copy_delta(delta), p)
                    outcomes.append((out.index, out.values))
                except Exception as error:  # noqa: BLE001 - the same error is the point
                    outcomes.append(type(error))
            if isinstance(outcomes[0], type):
                assert outcomes[0] is outcomes[1]
            else:
                assert all(same_bits(a, b) for a, b in zip(outcomes[0], outcomes[1]))
            assert same_bits(reference.pending, compiled.pending)


# ToDelta's kernels against the loops they replaced (commit fc7b59d), run as plain Python.


def reference_change_magnitudes(x, last, tile, out):
    channels, height, width = x.shape
    tiles_w = out.shape[1]
    for c in range(channels):
        for y in range(height):
            ty = y // tile
            for tx in range(tiles_w):
                biggest = out[ty, tx]
                for col in range(tx * tile, min(width, tx * tile + tile)):
                    change = abs(x[c, y, col] - last[c, y, col])
                    if change > biggest:
                        biggest = change
                out[ty, tx] = biggest


def reference_take(x, last, index, tile, tiles_w, out):
    channels, height, width = x.shape
    for i in range(index.shape[0]):
        y0 = (index[i] // tiles_w) * tile
        x0 = (index[i] % tiles_w) * tile
        for c in range(channels):
            for dy in range(min(tile, height - y0)):
                for dx in range(min(tile, width - x0)):
                    value = x[c, y0 + dy, x0 + dx]
                    out[i, c, dy, dx] = value - last[c, y0 + dy, x0 + dx]
                    last[c, y0 + dy, x0 + dx] = value


class ReferenceToDelta:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.last = None
        self.previous = None

    def reset(self, value):
        g = self.grid
        self.last = np.array(value, np.float32).reshape(g.channels, g.height, g.width)
        self.previous = None

    def __call__(self, value, percentage):
        g = self.grid
        value = np.ascontiguousarray(value, np.float32).reshape(g.channels, g.height, g.width)
        magnitudes = np.zeros((g.tiles_h, g.tiles_w), np.float32)
        reference_change_magnitudes(value, self.last, g.tile, magnitudes)
        threshold = 0.0
        if percentage > 0:
            fresh = np.zeros((g.tiles_h, g.tiles_w), np.float32)
            reference_change_magnitudes(value, self.last if self.previous is None else self.previous, g.tile, fresh)
            threshold = reference_threshold(fresh.ravel(), percentage)
            self.previous = value.copy()
        passed = np.flatnonzero(magnitudes.ravel() > threshold)
        values = np.zeros((len(passed), g.channels, g.tile, g.tile), np.float32)
        reference_take(value, self.last, passed, g.tile, g.tiles_w, values)
        return Delta(self.grid, passed, values)


@st.composite
def dense_frames(draw):
    grid = Grid(
        channels=draw(st.integers(1, 3)),
        height=draw(st.integers(1, 11)),
        width=draw(st.integers(1, 11)),
        tile=draw(st.integers(1, 5)),
    )
    shape = (grid.channels, grid.height, grid.width)
    first = draw(arrays(np.float32, shape, elements=ELEMENTS))
    sequence = []
    for _ in range(draw(st.integers(1, 5))):
        frame = (sequence[-1][0] if sequence else first).copy()
        changed = draw(arrays(np.bool_, shape))
        frame[changed] = draw(arrays(np.float32, int(changed.sum()), elements=ELEMENTS))
        sequence.append((frame, draw(PERCENTAGES)))
    return grid, first, sequence


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dense_frames())
def test_to_delta_matches_reference(case):
    grid, first, sequence = case
    reference, compiled = ReferenceToDelta(grid), ToDelta(grid)
    reference.reset(first)
    compiled.reset(first)
    for frame, (value, percentage) in enumerate(sequence):
        with np.errstate(all="ignore"):
            expected = reference(value.copy(), percentage)
            got = compiled(value.copy(), percentage)
        assert same_bits(expected.index, got.index), f"frame {frame}: passed {got.index}, expected {expected.index}"
        assert same_bits(expected.values, got.values), f"frame {frame}: values differ"
        assert same_bits(reference.last, compiled.last)
