"""Filter thresholds calibrated on frames: what they measure, and how the filters use them."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.errors import DelucevaError
from deluceva.operators import DeltaTensor, Layout
from deluceva.runtime.boundaries import Entry
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


def test_calibrated_quantiles_are_the_position_change_magnitudes():
    session = Session(_model(), plan="delta")
    frames = _frames(6)
    thresholds = session.calibrate(frames)
    magnitudes = []
    for before, after in zip(frames, frames[1:]):
        magnitudes.extend(np.abs(after - before)[0].max(axis=0).ravel())  # largest over channels
    assert set(thresholds.quantiles) == {"x"}  # y is only the model's output: never filtered
    for p in (0.25, 0.5, 0.9):
        expected = np.float32(np.interp(p, np.linspace(0, 1, 201), np.quantile(magnitudes, np.linspace(0, 1, 201))))
        assert thresholds.threshold("x", p) == pytest.approx(float(expected), rel=1e-6)
    assert thresholds.threshold("x", 0.0) == 0.0
    values = [thresholds.threshold("x", p) for p in np.linspace(0, 0.99, 50)]
    assert values == sorted(values)


def test_calibrated_filter_holds_back_noise_and_passes_motion():
    """After calibration, p = 0.9 sits between the noise and the moving square (6% of the
    positions): the square's positions pass, noise is mostly held back; what is held back stays
    under the threshold, and its effect on the output under the Conv's gain times it; p = 0
    stays exact."""
    frames = _frames(12)
    model = _model()
    session = Session(model, plan="delta")
    thresholds = session.calibrate(frames[:6])
    session.run(frames[5])
    outputs = session.run(frames[6], 0.9)
    passed = set(session.executor.tensors["x"].positions())
    square = {y * 16 + x for y in range(8, 12) for x in range(4, 8)}
    assert square <= passed and len(passed - square) < 0.15 * (256 - 16)
    seen = session.executor.tensors["x"].dense()
    assert 0 < np.abs(seen - frames[6]).max() <= thresholds.threshold("x", 0.9)
    assert "y" not in session.executor.filtered
    weight = numpy_helper.to_array(model.graph.initializer[0])
    gain = np.abs(weight).reshape(4, -1).sum(axis=1).max()
    bound = gain * thresholds.threshold("x", 0.9)
    exact = Session(_model(), plan="dense").run(frames[6])
    assert 0 < np.abs(outputs[0] - exact[0]).max() <= bound
    session.reset()
    session.run(frames[6])
    for frame in frames[7:]:
        np.testing.assert_allclose(session.run(frame, 0.0)[0], Session(_model(), plan="dense").run(frame)[0],
                                   rtol=1e-5, atol=1e-5)


def test_held_back_change_accumulates_until_it_passes_and_a_quiet_frame_does_not_flush_it():
    tensor = DeltaTensor(Layout(1, 2, 2))
    entry = Entry(tensor)
    entry.load(np.zeros((1, 1, 2, 2), np.float32))
    tensor.threshold[0] = 1.0
    drift = np.zeros((1, 1, 2, 2), np.float32)
    drift[0, 0, 0, 1] = 0.4
    assert entry(drift) and tensor.count[0] == 0  # 0.4 < 1: held back
    assert entry(drift) and tensor.count[0] == 0  # nothing new: still held
    assert entry(2 * drift) and tensor.count[0] == 0  # 0.8 < 1
    assert entry(3 * drift) and list(tensor.positions()) == [1]  # 1.2 > 1: passes, all of it
    np.testing.assert_allclose(tensor.dense(), 3 * drift)


def test_calibration_needs_two_frames():
    with pytest.raises(DelucevaError, match="at least 2 frames"):
        Session(_model(), plan="delta").calibrate(_frames(1))


def test_running_above_zero_needs_calibration():
    session = Session(_model(), plan="delta")
    session.run(_frames(1)[0])
    with pytest.raises(DelucevaError, match="calibrate"):
        session.run(_frames(2)[1], 0.5)


def test_thresholds_shared_between_sessions_of_one_model():
    frames = _frames(6)
    first = Session(_model(), plan="delta")
    thresholds = first.calibrate(frames)
    second = Session(_model(), plan={"relu": "delta"})
    # The first plan's thresholds do not cover what the second filters (the Conv's output c):
    # refused, not silently unfiltered.
    with pytest.raises(DelucevaError, match="do not cover 1 filtered tensor"):
        second.use_thresholds(thresholds)
    third = Session(_model(), plan="delta")
    third.use_thresholds(thresholds)
    third.run(frames[0])
    third.run(frames[1], 0.7)
    assert third.executor.tensors["x"].threshold[0] == np.float32(thresholds.threshold("x", 0.7)) > 0


def test_calibrate_sessions_measures_only_the_tensors_some_plan_filters():
    from deluceva.session import calibrate_sessions

    frames = _frames(6)
    dense = Session(_model(), plan="dense")
    # An all-dense plan filters the frame only: a frame that changes nothing above it is skipped.
    assert set(calibrate_sessions([dense], frames).quantiles) == dense.filtered_tensors() == {"x"}
    delta = Session(_model(), plan={"relu": "delta"})
    full = Session(_model(), plan="delta")
    thresholds = calibrate_sessions([dense, delta, full], frames)
    assert set(thresholds.quantiles) == delta.filtered_tensors() | full.filtered_tensors() == {"c", "x"}
    for session in (delta, full):
        session.run(frames[0])
        session.run(frames[1], 0.5)
    assert delta.executor.tensors["c"].threshold[0] == np.float32(thresholds.threshold("c", 0.5)) > 0
    assert full.executor.tensors["x"].threshold[0] == np.float32(thresholds.threshold("x", 0.5)) > 0
