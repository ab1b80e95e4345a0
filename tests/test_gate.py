"""The frame gate (`deluceva.playback.gate`) in the run loop: which frames it holds, drift since
the last frame that ran, exactness and no cost at the setting 0, what reference frames measure,
and the knob calibrated on first frames."""

from __future__ import annotations

import numpy as np
import pytest

from deluceva.controller import FixedController
from deluceva.demo import build_demo_model
from deluceva.metrics import rel_l2
from deluceva.playback.gate import FrameGate, GateSchedule, calibrate_gate
from deluceva.playback.loop import SessionsByPercentage, VideoRunner, summarise

HEIGHT, WIDTH = 32, 48  # 4 x 6 = 24 tiles of 8 x 8


def _rel_l2(outputs, references):
    return rel_l2(list(outputs), list(references))


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """The demo CNN at 32 x 48, one dense and one delta plan (p from 0.2), calibrated."""
    import onnx

    from deluceva.planner import load_model
    from deluceva.session import Session, calibrate_sessions

    path = tmp_path_factory.mktemp("gate") / "tiny.onnx"
    onnx.save(build_demo_model(HEIGHT, WIDTH), path)
    model = load_model(str(path))
    plans = SessionsByPercentage([Session(model, plan="dense"), Session(model, plan="delta")], [0.0, 0.2])
    calibrate_sessions(plans.sessions, _drifting(6, seed=1))
    return plans


def _base(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, HEIGHT, WIDTH), dtype=np.float32)


def _with_tiles(frame: np.ndarray, tiles) -> np.ndarray:
    """`frame` with each (row, column) 8 x 8 tile brightened by 0.5."""
    out = frame.copy()
    for row, column in tiles:
        out[..., row * 8:(row + 1) * 8, column * 8:(column + 1) * 8] += 0.5
    return out


def _drifting(count: int, seed: int = 0) -> list[np.ndarray]:
    """Each frame one more tile changed than the one before (a slow drift: one tile per frame)."""
    frames, tiles = [], []
    base = _base(seed)
    for index in range(count):
        frames.append(_with_tiles(base, tiles))
        tiles = tiles + [(index // 6 % 4, index % 6)]
    return frames


def _run(plans, frames, schedule, controller=None, reference_every=100):
    for session in plans.sessions:
        session.reset()
    setting = schedule.points[-1][0] if schedule is not None else 0.0
    runner = VideoRunner(plans, controller or FixedController(setting), _rel_l2, reference_every, setting, gate=schedule)
    return [runner.step(frame) for frame in frames]


def test_gate_counts_tiles_changed_beyond_its_threshold():
    gate = FrameGate(0.3)
    base = _base()
    gate.ran(base)
    assert gate.share(base) == 0.0
    assert gate.share(_with_tiles(base, [(0, 0), (3, 5)])) == pytest.approx(2 / 24)
    small = base + 0.2  # every pixel moved, but under the threshold
    assert gate.share(small) == 0.0
    assert gate.share(_with_tiles(small, [(1, 1)])) == pytest.approx(1 / 24)


def test_gate_keeps_its_own_copy_of_the_last_frame_that_ran():
    """The gate compares with the frame as it ran, even when the caller reuses that buffer."""
    gate = FrameGate(0.3)
    frame = _base()
    kept = frame.copy()
    gate.ran(frame)
    frame += 0.5  # the caller decodes the next frame into the same buffer
    assert gate.share(kept) == 0.0 and gate.share(frame) == 1.0


@pytest.mark.parametrize("shape", [(1, 3, 32, 48), (1, 3, 30, 45), (1, 1, 17, 9), (3, 21, 64)])
def test_gate_share_is_the_share_of_tiles_changed_beyond_the_threshold(shape):
    """On frames whose sides are not whole tiles too: the share equals the tiles of
    `tile_changes` (the largest change in each tile, read every 4th row and column) over the
    threshold."""
    from deluceva.playback.gate import tile_changes

    rng = np.random.default_rng(sum(shape))
    base = rng.random(shape, dtype=np.float32)
    gate = FrameGate(0.6)
    gate.ran(base)
    shares = []
    for scale in (0.3, 0.62, 0.65, 0.7, 2.0):
        frame = base + rng.random(shape, dtype=np.float32) * scale
        shares.append(float((tile_changes(frame, base) > 0.6).mean()))
        assert gate.share(frame) == shares[-1]
    assert shares[0] == 0.0 and shares[-1] == 1.0 and any(0.0 < share < 1.0 for share in shares)


def test_gated_frames_reuse_the_last_outputs_and_are_counted(plans):
    """g = 0.1 of 24 tiles: frames with 1 or 2 tiles changed since the last frame that ran are
    held, 3 run."""
    base = _base()
    frames = [base, _with_tiles(base, [(0, 0)]), _with_tiles(base, [(0, 0), (0, 1)]),
              _with_tiles(base, [(0, 0), (0, 1), (0, 2)]), _with_tiles(base, [(0, 0), (0, 1), (0, 2), (1, 0)])]
    schedule = GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.5, 0.1)])
    results = _run(plans, frames, schedule)
    assert [r.gated for r in results] == [False, True, True, False, True]
    assert summarise(results, plans)["gated_frames"] == 3
    for index in (1, 2):
        assert all(np.array_equal(a, b) for a, b in zip(results[index].outputs, results[0].outputs))
    assert all(np.array_equal(a, b) for a, b in zip(results[4].outputs, results[3].outputs))
    assert results[1].flops == 0.0 and results[3].flops > 0
    assert results[1].percentage == 0.5 and results[1].setting == 0.5


def test_gate_compares_with_the_last_frame_that_ran_so_drift_triggers(plans):
    """One more tile per frame: against the previous frame every frame changed 1 tile of 24 and
    would be held for ever; against the last frame that ran, the third tile runs it."""
    frames = _drifting(9)
    results = _run(plans, frames, GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.5, 0.1)]))
    assert [r.gated for r in results] == [False, True, True, False, True, True, False, True, True]


def test_setting_zero_is_exact_and_never_reads_the_gate(plans, monkeypatch):
    """At the setting 0 the pair is (0, 0): every frame runs exactly, and the gate's statistic is
    never computed (it costs nothing there)."""
    def forbidden(self, frame):
        raise AssertionError("the gate was read at the setting 0")

    monkeypatch.setattr(FrameGate, "share", forbidden)
    frames = _drifting(8)
    schedule = GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.5, 0.4)])
    for session in plans.sessions:
        session.reset()
    runner = VideoRunner(plans, FixedController(0.0), _rel_l2, 3, 0.0, gate=schedule)
    for frame in frames:
        result = runner.step(frame)
        assert not result.gated and result.percentage == 0.0
        assert _rel_l2(result.outputs, plans.sessions[0].reference(frame)) < 1e-5


def test_a_gated_reference_measures_what_the_user_received(plans):
    """On a gated frame that is due for a reference (on a delta plan), the error is the reused
    outputs' against the dense run, the frame gets the dense outputs, and later frames are gated
    against it."""
    base = _base()
    frames = [base, _with_tiles(base, [(0, 0)]), _with_tiles(base, [(0, 0), (1, 1)]),
              _with_tiles(base, [(0, 0), (1, 1), (2, 2)])]
    # The gate over the delta plan; the reused outputs are frame 0's, a keyframe's: exact.
    # K = 6: frame 2 is the second gated frame since the reference at 0, K // 3 = 2: a reference.
    results = _run(plans, frames, GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.5, 0.1)]), reference_every=6)
    first, held = results[0], results[2]
    assert results[1].gated and not results[1].reference
    assert held.gated and held.reference
    dense = plans.sessions[0].reference(frames[2])
    assert held.error == pytest.approx(_rel_l2(first.outputs, dense)) and held.error > 0
    assert _rel_l2(held.outputs, dense) < 1e-5
    # Frame 3 differs by one tile from frame 2 (delivered exactly), by three from frame 0: held.
    assert results[3].gated


def test_schedule_maps_settings_to_pairs():
    schedule = GateSchedule(0.1, [(0.5, 0.5, 0.0), (0.8, 0.7, 0.05)])
    assert schedule.points[0] == (0.0, 0.0, 0.0)  # always exact at 0
    assert schedule.pair(0.0) == (0.0, 0.0) and schedule.pair(0.49) == (0.0, 0.0)
    assert schedule.pair(0.6) == (0.5, 0.0)
    assert schedule.pair(0.85) == (0.7, 0.05)


def _noisy_still(count: int, seed: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = _base()
    return [base + rng.normal(0, 0.002, base.shape).astype(np.float32) for _ in range(count)]


def test_calibration_picks_the_gate_on_a_still_scene_and_nothing_at_zero(plans):
    """A still scene with sensor noise: reusing outputs costs no error within the budget and
    saves the runs, so the knob's next point after (0, 0) gates; the setting 0 never does."""
    frames = _noisy_still(12)
    schedule = calibrate_gate(plans, _rel_l2, frames, target=0.04, limit=0.1, percentages=(0.0, 0.5))
    assert schedule.points[0] == (0.0, 0.0, 0.0)
    assert len(schedule.points) > 1 and schedule.points[1][2] > 0
    assert schedule.start >= schedule.points[1][0] and schedule.ceiling == schedule.points[-1][0]
    # The noise is under the chosen pixel threshold: a frame of it is held.
    gate = FrameGate(schedule.threshold)
    gate.ran(frames[0])
    assert gate.share(frames[1]) == 0.0


def test_the_knob_is_the_cheapest_pair_at_each_error_level(plans):
    """Along the knob the calibration error never falls and the cost always does; every pair
    measured that is not on it is beaten by a point of no more error and lower cost; nothing past
    the limit is on it."""
    frames = _drifting(4, seed=2) + _noisy_still(8)
    limit = 0.3
    schedule = calibrate_gate(plans, _rel_l2, frames, target=0.05, limit=limit, percentages=(0.0, 0.5, 0.9))
    measured = {(row["percentage"], row["gate"]): (row["error"], row["cost_ms"]) for row in schedule.table}
    knob = [measured[(p, g)] for _, p, g in schedule.points]
    assert len(knob) > 2
    assert all(a[0] <= b[0] and a[1] > b[1] for a, b in zip(knob, knob[1:]))
    assert all(error <= limit for error, _ in knob)
    for pair, (error, cost) in measured.items():
        if error <= limit and pair not in {(p, g) for _, p, g in schedule.points}:
            assert any(e <= error and c <= cost for e, c in knob)
    settings = [k for k, _, _ in schedule.points]
    assert settings == sorted(settings) and settings[-1] == pytest.approx(0.95)


def test_with_a_frame_limit_no_pair_that_loses_too_many_frames_joins_the_knob(plans):
    """A detection-like metric: every gated frame loses a box (0.3), every frame that ran is exact.
    With a loose limit on the mean the gated pairs join the knob; with det's frame limit they
    are left out, since well over 5% of their frames are over it."""
    frames = _noisy_still(12)

    def missed_box(outputs, references):
        return 0.3 if _rel_l2(outputs, references) > 1e-6 else 0.0

    loose = calibrate_gate(plans, missed_box, frames, target=0.2, limit=1.0, percentages=(0.0,))
    assert any(g > 0 for _, _, g in loose.points)
    guarded = calibrate_gate(plans, missed_box, frames, target=0.2, limit=1.0, percentages=(0.0,), frame_limit=0.1)
    assert guarded.points == [(0.0, 0.0, 0.0)] and guarded.ceiling == 0.0
    gated_rows = [row for row in guarded.table if row["gate"] > 0 and row["error"] > 0]
    assert gated_rows and all(row["frames_over_limit"] > 0.05 for row in gated_rows)


# -- plans slower than dense are never run -----------------------------------------------------


def test_a_plan_measured_slower_than_dense_is_retired_and_its_range_runs_dense(plans, monkeypatch):
    """The delta plan made 20 ms slower a frame: measured slower than dense on the first frames,
    retired; a controller at p in its range then runs the dense plan, exactly, and its reference
    frames need no dense run."""
    import time

    from deluceva.playback.calibration import retire_slow_plans

    slow = plans.sessions[1]
    run = slow.run

    def slower(frame, percentage=0.0, keyframe=False):
        time.sleep(0.02)
        return run(frame, percentage, keyframe)

    frames = _drifting(6)
    monkeypatch.setattr(slow, "run", slower)
    try:
        ratios = retire_slow_plans(plans, frames)
        assert ratios[1] > 1.0 and plans.retired == {1}
        assert plans.index_below(0.5) == 0 and plans.effective(0.5) == 0.0
        references = []
        reference = plans.sessions[0].reference
        monkeypatch.setattr(plans.sessions[0], "reference",
                            lambda frame, copy=True: references.append(frame) or reference(frame, copy))
        results = _run(plans, frames, None, controller=FixedController(0.5), reference_every=2)
        assert all(r.plan == 0 and r.percentage == 0.0 for r in results)
        assert all(r.setting == 0.5 for r in results[1:])  # the first frame at the start, 0
        # One plain dense run a frame (the frame's answer), none more for a reference.
        assert [r.error for r in results if r.reference][1:] == [0.0, 0.0] and len(references) == len(frames)
        monkeypatch.undo()
        for result, frame in zip(results, frames):
            assert _rel_l2(result.outputs, plans.sessions[0].reference(frame)) < 1e-5
    finally:
        plans.retire([])


def test_a_plan_faster_than_dense_is_kept(plans, monkeypatch):
    import time

    from deluceva.playback.calibration import retire_slow_plans

    dense = plans.sessions[1].reference

    def slower_dense(frame):
        time.sleep(0.02)
        return dense(frame)

    monkeypatch.setattr(plans.sessions[1], "reference", slower_dense)
    ratios = retire_slow_plans(plans, _drifting(6))
    assert ratios[1] < 1.0 and plans.retired == set()


def test_p_in_an_all_dense_first_plans_range_runs_at_zero(plans, monkeypatch):
    """Below the first delta plan the all-dense plan runs at p = 0: exact, and its references
    need no dense run (at p > 0 it paid one on every reference for nothing)."""
    assert plans.effective(0.1) == 0.0 and plans.effective(0.3) == 0.3
    references, runs = [], []
    reference, run = plans.sessions[0].reference, plans.sessions[0].run
    monkeypatch.setattr(plans.sessions[0], "reference",
                        lambda frame, copy=True: references.append(frame) or reference(frame, copy))
    monkeypatch.setattr(plans.sessions[0], "run", lambda *a, **k: runs.append(k) or run(*a, **k))
    frames = _drifting(6)
    results = _run(plans, frames, None, controller=FixedController(0.1), reference_every=2)
    assert all(r.percentage == 0.0 and r.plan == 0 for r in results)
    assert [r.error for r in results if r.reference][1:] == [0.0, 0.0]
    # Each frame, the first included (an all-dense plan has no state for a keyframe to fill), is
    # one plain onnxruntime run: exact, and no second dense run on a reference.
    assert runs == [] and len(references) == len(frames)
    for result, frame in zip(results, frames):
        assert _rel_l2(result.outputs, reference(frame)) < 1e-5


def test_a_reference_comes_after_a_third_of_k_gated_frames(plans):
    """Reused outputs age: with K = 9, a reference after every 3 gated frames, not only every 9."""
    base = _base()
    frames = [base] + [_with_tiles(base, [(0, 0)]) for _ in range(8)]
    results = _run(plans, frames, GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.5, 0.1)]), reference_every=9)
    assert all(r.gated for r in results[1:])
    assert [r.index for r in results if r.reference] == [0, 3, 6]


def test_on_the_dense_plan_a_gated_reference_waits_for_the_next_frame_that_runs(plans, monkeypatch):
    """On the all-dense plan at p = 0 a reference due on a gated frame costs no dense run there:
    the next frame that runs (exact anyway) is the reference, and measures the reused outputs
    against its own. A scene held 2 K frames after a reference gets the next on a gated frame."""
    base = _base()
    frames = [base] + [_with_tiles(base, [(0, 0)])] * 4 + [_with_tiles(base, [(0, 0), (1, 1), (2, 2)])]
    dense = plans.sessions[0]
    calls = []
    reference = dense.reference
    monkeypatch.setattr(dense, "reference", lambda frame, copy=True: calls.append(copy) or reference(frame, copy))
    results = _run(plans, frames, GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.0, 0.1)]), reference_every=6)
    assert [r.gated for r in results] == [False, True, True, True, True, False]
    assert [r.index for r in results if r.reference] == [0, 5]  # due at 2 (K // 3 gated), measured at 5
    assert calls == [False, False]  # frame 0 and frame 5, the plain runs: no dense run on a gated frame
    assert results[5].error == pytest.approx(_rel_l2(results[0].outputs, reference(frames[5]))) and results[5].error > 0
    still = [base] + [_with_tiles(base, [(0, 0)])] * 14
    results = _run(plans, still, GateSchedule(0.3, [(0.0, 0.0, 0.0), (0.5, 0.0, 0.1)]), reference_every=6)
    assert all(r.gated for r in results[1:]) and [r.index for r in results if r.reference] == [0, 12]  # 2 K


def test_an_all_dense_plan_runs_the_reference_session_itself(monkeypatch, tmp_path):
    """An all-dense plan's one segment is the whole model: it is the session references use (one
    whole-model session, not two, in the shared arena), and its outputs, copied or not, are
    plain onnxruntime's."""
    import onnx
    import onnxruntime as ort

    from deluceva.runtime import executor
    from deluceva.session import Session

    built = []
    make = executor.inference_session
    monkeypatch.setattr(executor, "inference_session", lambda *a, **k: built.append(k) or make(*a, **k))
    path = tmp_path / "tiny.onnx"
    onnx.save(build_demo_model(HEIGHT, WIDTH), path)
    session = Session(str(path), plan="dense")
    frames = _drifting(3)
    outputs = [session.run(frame) for frame in frames]
    # Not copied, and kept while later frames run (a gated frame reuses them): still its own.
    uncopied = [session.reference(frame, copy=False) for frame in frames]
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for frame, ran, kept in zip(frames, outputs, uncopied):
        expected = plain.run(None, {plain.get_inputs()[0].name: frame})
        for answer in (session.reference(frame), kept, ran):
            assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(answer, expected))
    # One whole-model session for the segment and references, with onnxruntime's memory pattern
    # and its spinning pool (it answers every frame, alone), and the first run's keyframe
    # session, without either.
    assert [(k["memory_pattern"], k.get("spinning", False)) for k in built] == [(True, True), (False, False)]
    # A plan with delta steps runs its reference rarely: no pattern (its one block grows the
    # arena), and no spinning (its pool would take the cores the next session needs).
    built.clear()
    Session(str(path), plan="delta").reference(frames[0])
    assert [(k["memory_pattern"], k.get("spinning", False)) for k in built] == [(False, False)]


def test_only_the_baseline_and_a_session_answering_alone_spin(monkeypatch):
    """onnxruntime's pools spin after a run by default; deluceva's sessions, run one after
    another, do not (with 2 threads on 2 cores the spinning made YOLOX-nano's delta plans 3-4x
    slower), and the plain onnxruntime baseline keeps the default, as users run it."""
    from deluceva.bench.baseline import plain_onnxruntime
    from deluceva.onnxruntime_session import inference_session, session_options, shared_arena_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "0"
    assert shared_arena_options(2).get_session_config_entry(key) == "0"
    assert session_options(2, spinning=True).get_session_config_entry(key) == "1"
    model = build_demo_model(HEIGHT, WIDTH).SerializeToString()
    assert inference_session(model, 2, shared_arena=True, spinning=True).get_session_options() \
        .get_session_config_entry(key) == "1"
    from deluceva.bench import baseline

    built = []
    monkeypatch.setattr(baseline, "inference_session", lambda *a, **k: built.append(inference_session(*a, **k)) or built[-1])
    plain_onnxruntime(model, 2)
    assert built[0].get_session_options().get_session_config_entry(key) == "1"
