"""Filter thresholds calibrated on frames: what they measure, and how the filters use them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.errors import DelucevaError
from deluceva.operators import Delta, Grid
from deluceva.runtime.boundaries import Filter
from deluceva.runtime.thresholds import Thresholds
from deluceva.session import Session


def _model():
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((0.3 * rng.standard_normal((4, 2, 3, 3))).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _frames(count: int, seed: int = 1, noise: float = 0.01, step: float = 1.0):
    """A static scene with small noise everywhere and one 4x4 square that changes a lot."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((1, 2, 16, 16)).astype(np.float32)
    frames = []
    for i in range(count):
        frame = base + noise * rng.standard_normal(base.shape).astype(np.float32)
        frame[:, :, 8:12, 4:8] += step * i
        frames.append(frame)
    return frames


def test_calibrated_quantiles_are_the_tile_change_magnitudes():
    session = Session(_model(), plan="delta")
    frames = _frames(6)
    thresholds = session.calibrate(frames)
    grid = Grid(2, 16, 16, 8)
    magnitudes = []
    for before, after in zip(frames, frames[1:]):
        change = np.abs(after - before)[0].reshape(2, 2, 8, 2, 8).max(axis=(0, 2, 4))
        magnitudes.extend(change.ravel())
    assert "x" in thresholds and "y" in thresholds
    assert grid.n_tiles == 4
    for p in (0.25, 0.5, 0.9):
        expected = np.float32(np.interp(p, np.linspace(0, 1, 201), np.quantile(magnitudes, np.linspace(0, 1, 201))))
        assert thresholds.threshold("x", p) == pytest.approx(float(expected), rel=1e-6)
    assert thresholds.threshold("x", 0.0) == 0.0
    values = [thresholds.threshold("y", p) for p in np.linspace(0, 0.99, 50)]
    assert values == sorted(values)


def test_calibrated_filter_holds_back_noise_and_passes_motion():
    """After calibration, p = 0.5 sits between the noise and the moving square: noise tiles are
    held back every frame, the square's tile passes; what is held back stays under the
    thresholds; p = 0 stays exact."""
    frames = _frames(12)
    model = _model()
    session = Session(model, plan="delta")
    thresholds = session.calibrate(frames[:6])
    session.run(frames[5])
    outputs = session.run(frames[6], 0.5)
    # Tiles are 8x8 on the 16x16 input: the square (rows 8-11, cols 4-7) lies in tile 2.
    assert list(session.executor._last_deltas["x"].index) == [2]
    assert 2 in session.executor._last_deltas["y"].index
    # Held back: under x's threshold at the input; nothing at the output y, which only the
    # model's output reads (holding it back would save no work). The Conv carries the input's
    # part by at most the largest absolute row sum of its weights (ReLU adds none).
    assert "y" not in session.executor.filtered
    weight = numpy_helper.to_array(model.graph.initializer[0])
    gain = np.abs(weight).reshape(4, -1).sum(axis=1).max()
    bound = gain * thresholds.threshold("x", 0.5)
    exact = Session(_model(), plan="dense").run(frames[6])
    assert 0 < np.abs(outputs[0] - exact[0]).max() <= bound
    session.reset()
    session.run(frames[6])
    for frame in frames[7:]:
        np.testing.assert_allclose(session.run(frame, 0.0)[0], Session(_model(), plan="dense").run(frame)[0],
                                   rtol=1e-5, atol=1e-5)


def test_calibrated_threshold_is_fixed_and_a_quiet_frame_does_not_flush_pending():
    grid = Grid(1, 8, 8, 4)
    filter_ = Filter(grid)
    filter_.threshold_at = lambda p: 1.0
    small = Delta(grid, np.array([0, 3], np.int64), np.full((2, 1, 4, 4), 0.4, np.float32))
    assert len(filter_(small, 0.5).index) == 0  # 0.4 < 1
    assert len(filter_(Delta.empty(grid), 0.5).index) == 0  # nothing new: still held
    out = filter_(small, 0.5)  # 0.8 < 1
    assert len(out.index) == 0
    out = filter_(small, 0.5)  # 1.2 > 1: both pass, with everything held back
    assert list(out.index) == [0, 3]
    np.testing.assert_allclose(out.values, 1.2, rtol=1e-6)


def test_calibration_needs_two_frames():
    with pytest.raises(DelucevaError, match="at least 2 frames"):
        Session(_model(), plan="delta").calibrate(_frames(1))


def test_thresholds_shared_between_sessions_of_one_model():
    frames = _frames(6)
    first = Session(_model(), plan="delta")
    thresholds = first.calibrate(frames)
    second = Session(_model(), plan={"relu": "delta"})
    second.use_thresholds(thresholds)
    assert all(b.threshold_at is not None for b in [*second.executor.filters.values(), *second.executor.to_delta.values()])
    assert isinstance(thresholds, Thresholds)


def test_calibrate_sessions_measures_only_the_tensors_some_plan_filters():
    from deluceva.session import calibrate_sessions

    frames = _frames(6)
    dense = Session(_model(), plan="dense")
    assert calibrate_sessions([dense], frames).quantiles == {}  # nothing filtered: nothing measured
    delta = Session(_model(), plan={"relu": "delta"})
    thresholds = calibrate_sessions([dense, delta], frames)
    assert set(thresholds.quantiles) == delta.filtered_tensors() == {"c", "y"}
    assert delta.executor.filters["y"].threshold_at is not None
