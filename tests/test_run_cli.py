"""`deluceva run`, `bench` and `demo`: the run loop, outputs written as the run goes, bad input.

Fast tests use the demo's generated CNN at a tiny size and synthesised clips; the slow ones run
the real models and videos in ../shared/data with each controller and both metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deluceva.cli import main
from deluceva.demo import build_demo_model
from deluceva.media.video import synthesise_clip
from deluceva.playback.loop import SessionsByPercentage, VideoRunner
from deluceva.files import GrowingNpy
from deluceva.metrics import rel_l2
from deluceva.playback.recorder import FrameRecorder

SUMMARY_FIELDS = {
    "frames", "threads", "ms_per_frame_median", "ms_per_frame_mean", "reference_frames", "error_mean",
    "error_p95", "error_max", "percentage_trace", "density_trace", "plan_variants", "model", "video",
    "metric", "budget", "controller", "seconds_to_first_output", "step_forms",
}


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 32x48 demo CNN and a 96x64 synthetic clip of 12 frames."""
    folder = tmp_path_factory.mktemp("tiny")
    model = folder / "tiny.onnx"
    onnx.save(build_demo_model(32, 48), model)
    clip = synthesise_clip(folder / "clip.mp4", width=96, height=64, frames=12, seed=3)
    return model, clip


def _onnxruntime_outputs(model: Path, inputs: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    stacked = [session.run(None, {"image": x}) for x in inputs]
    return {name: np.stack([frame[i] for frame in stacked]) for i, name in enumerate(names)}


# -- run ------------------------------------------------------------------------------------


def test_run_writes_outputs_and_summary(tiny, tmp_path):
    model, clip = tiny
    out, summary_path = tmp_path / "out.npz", tmp_path / "summary.json"
    code = main(["run", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0", "--reference-every", "5",
                 "--outputs", str(out), "--save-inputs", "--summary", str(summary_path)])
    assert code == 0
    with np.load(out) as data:
        arrays = {key: data[key] for key in data.files}
    assert set(arrays) == {"heads", "coarse", "input:image"}
    assert arrays["heads"].shape == (12, 1, 6, 16, 24)
    assert arrays["input:image"].shape == (12, 1, 3, 32, 48)
    # p = 0 is exact: every frame matches onnxruntime on the same stored inputs.
    reference = _onnxruntime_outputs(model, arrays["input:image"])
    for name in ("heads", "coarse"):
        for got, want in zip(arrays[name], reference[name]):
            assert _rel_l2([got], [want]) < 1e-5  # float rounding only
    summary = json.loads(summary_path.read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["frames"] == 12 and summary["threads"] == 1 and summary["controller"] == "fixed"
    assert summary["reference_frames"] == 3  # frames 0, 5 and 10
    assert summary["error_max"] < 1e-3
    assert len(summary["percentage_trace"]) == len(summary["density_trace"]) == 12
    assert summary["plan_variants"]["delta"] > 0
    # Set-up counts: at least the first frame's own time.
    assert summary["seconds_to_first_output"] * 1000 >= summary["ms_trace"][0] > 0
    assert not (tmp_path / "out.npz.parts").exists()


def test_run_without_plan_compiles_on_the_fly_and_says_so(tiny, tmp_path, capsys):
    model, clip = tiny
    summary_path = tmp_path / "summary.json"
    assert main(["run", str(model), str(clip), "--controller", "fixed", "--percentage", "0.5",
                 "--summary", str(summary_path)]) == 0
    assert "compiling plans on the fly" in capsys.readouterr().err
    summary = json.loads(summary_path.read_text())
    assert "compiled on the fly" in summary["plan"]
    assert summary["plan_percentages"][0] == 0.0 and summary["frames"] == 12


def test_interrupted_run_keeps_finished_frames(tiny, tmp_path, monkeypatch):
    """Ctrl-C after 7 frames: OUT.npz and the summary hold exactly frames 0..6."""
    import deluceva.media.video as video_module
    from deluceva.playback.setup import PROFILE_FRAMES

    model, clip = tiny
    real_open = video_module.open_video

    class Interrupting:
        def __init__(self, reader):
            self.reader = reader

        def __getattr__(self, name):
            return getattr(self.reader, name)

        def __iter__(self):
            for index, frame in enumerate(self.reader):
                if index == 7:
                    raise KeyboardInterrupt
                yield frame

    def open_video(*args, **kwargs):
        if kwargs.get("frames") == PROFILE_FRAMES:  # the first frames, read to calibrate the filters
            return real_open(*args, **kwargs)
        return Interrupting(real_open(*args, **kwargs))

    monkeypatch.setattr(video_module, "open_video", open_video)
    out, summary_path = tmp_path / "out.npz", tmp_path / "summary.json"
    code = main(["run", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0.3",
                 "--outputs", str(out), "--summary", str(summary_path)])
    assert code == 130
    with np.load(out) as data:
        assert data["heads"].shape[0] == 7 and data["coarse"].shape[0] == 7
        assert np.isfinite(data["heads"]).all()
    summary = json.loads(summary_path.read_text())
    assert summary["frames"] == 7 and summary["interrupted"] is True


def test_growing_npy_is_valid_after_every_frame(tmp_path):
    path = tmp_path / "part.npy"
    part = GrowingNpy(path, (2, 3), np.float32)
    frames = [np.full((2, 3), i, np.float32) for i in range(5)]
    for count, frame in enumerate(frames, start=1):
        part.append(frame)
        # Another reader sees a valid array of the frames so far while the writer is still open.
        np.testing.assert_array_equal(np.load(path), np.stack(frames[:count]))
    np.testing.assert_array_equal(part.read(3), frames[3])
    part.close()


def test_recorder_refuses_changing_shapes(tmp_path):
    recorder = FrameRecorder(tmp_path / "x.npz")
    recorder.add({"y": np.zeros((2, 2))})
    with pytest.raises(Exception, match="shape"):
        recorder.add({"y": np.zeros((3, 2))})
    recorder.close()
    with np.load(tmp_path / "x.npz") as data:
        assert data["y"].shape == (1, 2, 2)


class _Steps:
    """A controller that plays a list of percentages and records what it observed."""

    def __init__(self, percentages):
        self.percentages = list(percentages)
        self.seen = []

    def update(self, observation):
        self.seen.append(observation)
        return self.percentages[min(len(self.seen) - 1, len(self.percentages) - 1)]


def _rel_l2(outputs, references):
    return rel_l2(list(outputs), list(references))


def test_runner_references_and_plan_switch(tiny):
    """References every K frames; crossing a compiled percentage switches plan at the next reference."""
    from deluceva.planner import load_model
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.session import Session

    model_path, clip = tiny
    model = load_model(str(model_path))
    from deluceva.session import calibrate_sessions

    plans = SessionsByPercentage([Session(model, plan="dense"), Session(model, plan="delta")], [0.0, 0.2])
    pre = Preprocessor.for_model(model.input_shape)
    inputs = [pre(rgb) for rgb in open_video(clip)]
    calibrate_sessions(plans.sessions, inputs[:4])  # as `deluceva run` does
    # p: frames 0-2 at 0, then 0.4 from frame 3 on (the controller's answer applies next frame).
    controller = _Steps([0.0, 0.0, 0.4])
    runner = VideoRunner(plans, controller, _rel_l2, reference_every=4, percentage=0.0)
    results = [runner.step(frame) for frame in inputs]
    reference = [r.index for r in results if r.reference]
    # Every 4 frames, plus frame 5: plan 1's first delta frame is measured at once (a probe).
    assert reference == [0, 4, 5, 9]
    # p = 0.4 from frame 3 on; plan 0 runs until the reference at frame 4, which measures it and
    # whose dense run fills plan 1's caches.
    assert [r.plan for r in results[:5]] == [0] * 5 and all(r.plan == 1 for r in results[5:])
    assert [r.index for r in results if r.error is not None] == [4, 5, 9]
    assert all(r.density == 1.0 for r in results[:5])
    assert all(r.density < 1.0 for r in results[5:] if not r.reference)
    assert results[3].percentage == 0.4 and controller.seen[4].error is not None


def _plans_and_frames(tiny, variants=("dense", "delta"), percentages=(0.0, 0.2)):
    """The tiny model compiled once per variant (plans for `percentages`), calibrated, and the
    clip's frames as model inputs."""
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.planner import load_model
    from deluceva.session import Session, calibrate_sessions

    model_path, clip = tiny
    model = load_model(str(model_path))
    plans = SessionsByPercentage([Session(model, plan=v) for v in variants], list(percentages))
    pre = Preprocessor.for_model(model.input_shape)
    inputs = [pre(rgb) for rgb in open_video(clip)]
    calibrate_sessions(plans.sessions, inputs[:4])
    return plans, inputs


def test_runner_switches_plan_on_the_reference_that_moved_p(tiny):
    """A controller that moves p only on measurements (as PI does): the reference whose error
    moved p into another plan's range switches the plan there, not a reference interval later."""

    class OnMeasurement:
        percentage = 0.0

        def update(self, observation):
            if observation.error is not None and observation.frame >= 4:
                self.percentage = 0.4
            return self.percentage

    plans, inputs = _plans_and_frames(tiny)
    runner = VideoRunner(plans, OnMeasurement(), _rel_l2, reference_every=4, percentage=0.0)
    results = [runner.step(frame) for frame in inputs]
    # Frame 4's reference moves p to 0.4: plan 1 from frame 5 on, whose first delta frame is a
    # probe (measured); waiting for the next reference would have run plan 0 until frame 8.
    assert [r.plan for r in results[:5]] == [0] * 5 and all(r.plan == 1 for r in results[5:])
    assert [r.index for r in results if r.reference] == [0, 4, 5, 9]
    assert all(r.density < 1.0 for r in results[5:] if not r.reference)
    for result, frame in zip(results, inputs):  # a reference frame's outputs are the exact dense ones
        if result.reference:
            assert _rel_l2(result.outputs, plans.sessions[0].reference(frame)) < 1e-5


def test_runner_does_not_climb_plans_on_a_probe(tiny):
    """p on a plan boundary: each measurement on the higher plan sends p below it, each on the
    lower one back above. Down switches at once; up only on a regular reference, never on the
    probe of a new plan, so the run does not turn every frame into a probe (it did: 141
    references in 150 frames on P-Net)."""

    class Boundary:
        percentage = 0.0

        def update(self, observation):
            if observation.error is not None:
                self.percentage = 0.1 if observation.percentage >= 0.2 else 0.4
            return self.percentage

    plans, inputs = _plans_and_frames(tiny)
    runner = VideoRunner(plans, Boundary(), _rel_l2, reference_every=4, percentage=0.0)
    results = [runner.step(frame) for frame in inputs]
    # 4: regular reference, p up, switch; 5: the new plan's probe, p down, switch back at once;
    # the next climb waits for the regular reference at 9.
    assert [r.index for r in results if r.reference] == [0, 4, 5, 9, 10]
    assert [r.plan for r in results] == [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]

    class Climbing:  # every measurement asks for the next plan up
        percentage = 0.0

        def update(self, observation):
            if observation.error is not None:
                self.percentage = min(self.percentage + 0.2, 0.5)
            return self.percentage

    three, inputs = _plans_and_frames(tiny, ("dense", "delta", "delta"), (0.0, 0.2, 0.4))
    runner = VideoRunner(three, Climbing(), _rel_l2, reference_every=4, percentage=0.0)
    results = [runner.step(frame) for frame in inputs]
    # The probe at 5 asks for plan 2: that waits for the regular reference at 9.
    assert [r.index for r in results if r.reference] == [0, 4, 5, 9, 10]
    assert [r.plan for r in results] == [0] * 5 + [1] * 5 + [2] * 2


def test_runner_refreshes_caches_only_when_the_plan_changes_or_p_falls(tiny):
    """A reference frame measures with a plain dense run; it reloads every cache (a keyframe, 3x
    the cost) only for a new plan's empty caches or after p fell below what they were filled at."""
    from deluceva.planner import load_model
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.session import Session, calibrate_sessions

    model_path, clip = tiny
    model = load_model(str(model_path))
    session = Session(model, plan="delta")
    pre = Preprocessor.for_model(model.input_shape)
    inputs = [pre(rgb) for rgb in open_video(clip)]
    calibrate_sessions([session], inputs[:4])
    calls = []
    run, reference = session.run, session.reference
    session.run = lambda *a, **k: calls.append("keyframe" if k.get("keyframe") else "delta") or run(*a, **k)
    session.reference = lambda *a: calls.append("reference") or reference(*a)
    # p: 0.5 on frames 1-3, 0.7 on 4-6, 0.3 from 7 on (each answer applies to the next frame).
    controller = _Steps([0.5, 0.5, 0.5, 0.7, 0.7, 0.7, 0.3])
    runner = VideoRunner(SessionsByPercentage([session], [0.0]), controller, _rel_l2, reference_every=3, percentage=0.0)
    results = [runner.step(frame) for frame in inputs]
    references = {r.index: r.percentage for r in results if r.reference}
    assert references == {0: 0.0, 3: 0.5, 6: 0.7, 9: 0.3}
    measured = [c for c in calls if c != "delta"]
    # Frame 0 is the keyframe; at 3 and 6 p rose (0 -> 0.5 -> 0.7): plain runs; at 9 it fell.
    assert measured == ["keyframe", "reference", "reference", "keyframe"]
    assert all(r.error is not None for r in results if r.reference and r.index)


def test_runner_measures_a_plan_without_delta_steps_without_a_second_run(tiny):
    """An all-dense plan is exact: its reference frames report error 0 and run the model once."""
    from deluceva.planner import load_model
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.session import Session

    model_path, clip = tiny
    model = load_model(str(model_path))
    session = Session(model, plan="dense")
    calls = []
    run, reference = session.run, session.reference
    session.run = lambda *args, **kwargs: calls.append(kwargs.get("keyframe", False)) or run(*args, **kwargs)
    # (An all-dense plan at p = 0 is answered by plain onnxruntime, the first frame included.)
    session.reference = lambda frame, copy=True: calls.append("reference") or reference(frame, copy)
    runner = VideoRunner(SessionsByPercentage([session], [0.0]), _Steps([0.0]), _rel_l2, reference_every=4, percentage=0.0)
    pre = Preprocessor.for_model(model.input_shape)
    results = [runner.step(pre(rgb)) for rgb in open_video(clip)]
    assert calls == ["reference"] * len(results)  # one run per frame, reference frames included
    assert [r.index for r in results if r.reference] == [0, 4, 8] and all(
        r.error == 0.0 for r in results if r.reference and r.index)


def test_runner_computes_change_statistics_only_for_controllers_that_use_them(tiny):
    from deluceva.planner import load_model
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.session import Session

    class Statistical(_Steps):
        uses_statistics = True

    model_path, clip = tiny
    model = load_model(str(model_path))
    pre = Preprocessor.for_model(model.input_shape)
    frames = [pre(rgb) for rgb in open_video(clip)]
    seen = {}
    for controller in (_Steps([0.0]), Statistical([0.0])):
        runner = VideoRunner(SessionsByPercentage([Session(model, plan="dense")], [0.0]), controller, _rel_l2, 4, 0.0)
        for frame in frames:
            runner.step(frame)
        seen[type(controller).__name__] = [o.changed_tiles for o in controller.seen]
    assert not any(seen["_Steps"])
    assert any(seen["Statistical"])


def test_runner_rejects_zero_reference_interval(tiny):
    with pytest.raises(Exception, match="at least 1"):
        VideoRunner(SessionsByPercentage.__new__(SessionsByPercentage), None, _rel_l2, reference_every=0)


# -- bad input: one line, exit 2 --------------------------------------------------------------


@pytest.mark.parametrize("extra, words", [
    (["--percentage", "1.5"], "outside [0, 1)"),
    (["--reference-every", "0"], "must be at least 1"),
])
def test_bad_options_exit_2(tiny, capsys, extra, words):
    model, clip = tiny
    with pytest.raises(SystemExit) as stop:
        main(["run", str(model), str(clip), *extra])
    assert stop.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]
    assert len(error_lines) == 1 and words in error_lines[0]


def test_generic_preprocessing_options_reach_the_model(tiny, tmp_path):
    model, clip = tiny
    out = tmp_path / "out.npz"
    assert main(["run", str(model), str(clip), "--plan", "dense", "--frames", "2", "--channels", "BGR",
                 "--scale", "0.5", "--mean", "1,2,3", "--outputs", str(out), "--save-inputs"]) == 0
    plain = tmp_path / "plain.npz"
    assert main(["run", str(model), str(clip), "--plan", "dense", "--frames", "2", "--outputs", str(plain),
                 "--save-inputs"]) == 0
    with np.load(out) as got, np.load(plain) as rgb:
        expected = rgb["input:image"][:, :, ::-1] * 0.5 - np.array([1, 2, 3], np.float32)[:, None, None]
        np.testing.assert_allclose(got["input:image"], expected, rtol=1e-6, atol=1e-5)


def test_generic_mean_of_the_wrong_length_is_refused(tiny, capsys):
    model, clip = tiny
    assert main(["run", str(model), str(clip), "--plan", "dense", "--mean", "1,2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mean" in err[0]


def test_preset_that_does_not_fit(tiny, capsys):
    model, clip = tiny
    assert main(["run", str(model), str(clip), "--preset", "yolox"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0]


def test_not_a_video(tiny, tmp_path, capsys):
    model, _ = tiny
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("this is not a video\n" * 50)
    assert main(["run", str(model), str(bogus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a video" in err[0] and "notes.mp4" in err[0]


# -- bench and demo ----------------------------------------------------------------------------


def test_bench_reports_and_writes_json_and_plot(tiny, tmp_path, capsys):
    model, clip = tiny
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(["bench", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--json", str(out), "--plot", str(picture)])
    assert code == 0
    table = capsys.readouterr().out
    assert "speedup" in table and "FLOP-reduction bound" in table and "efficiency" in table
    figures = json.loads(out.read_text())
    assert figures["frames"] == 12 and figures["threads"] == 1
    assert figures["error_max"] < 1e-3  # p = 0 is exact against onnxruntime
    assert figures["timing"] == "in blocks of 8 frames"  # onnxruntime timed beside deluceva
    assert figures["flop_reduction_bound"] > 0 and figures["speedup"] > 0
    assert figures["onnxruntime_peak_mib"] is not None and figures["deluceva_peak_mib"] is not None
    assert figures["skip_speedup"] > 0 and 0 <= figures["skip_share"] <= 1
    assert len(figures["error_trace"]) == len(figures["onnxruntime_ms_trace"]) == 12
    assert "cores" in figures["machine"]
    assert picture.stat().st_size > 1000


def test_bench_with_threads_times_onnxruntime_alone(tiny, tmp_path, capsys):
    """With more than one thread, sessions interleaved in one process slow each other (a pool
    spins after its run): onnxruntime's own pass is the baseline, and the JSON says so."""
    model, clip = tiny
    out = tmp_path / "bench.json"
    assert main(["bench", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--threads", "2", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["threads"] == 2 and figures["timing"] == "separate passes"
    assert figures["error_max"] < 1e-3 and len(figures["onnxruntime_ms_trace"]) == 12


def test_bench_sweep_lands_the_controllers_on_the_fixed_p_curve(tiny, tmp_path, capsys):
    """`--sweep`: each p run on the run's plans (p = 0 all dense, exact), the best point within the
    budget, the pi and learned controllers and, with --gate, the gated run beside frame skipping."""
    model, clip = tiny
    out = tmp_path / "bench.json"
    code = main(["bench", str(model), str(clip), "--sweep", "0.5,0.9", "--gate", "--reference-every", "4",
                 "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "fixed-p curve" in table and "best within the budget" in table and "deluceva + gate" in table
    figures = json.loads(out.read_text())
    sweep = figures["sweep"]
    assert [p["percentage"] for p in sweep] == [0.0, 0.5, 0.9]  # 0 always included
    assert sweep[0]["error_max"] < 1e-3 and sweep[0]["percentage_mean"] == 0.0
    assert all(p["reference_frames"] == 3 for p in sweep)  # frames 0, 4, 8: counted as a run counts them
    within = [p for p in sweep if p["error_mean"] <= figures["budget"]]
    assert figures["sweep_best"]["speedup"] == max(p["speedup"] for p in within)
    assert set(figures["controllers"]) == {"pi", "learned", "pi + gate", "learned + gate"}
    for landing in figures["controllers"].values():
        assert landing["of_best"] == pytest.approx(landing["speedup"] / figures["sweep_best"]["speedup"])
        assert 0 <= landing["frames_within_limit"] <= 1 and "skip_equal_speedup" in landing
        assert len(landing["setting_trace"]) == len(landing["error_trace"]) == 12
        assert len(landing["reference_errors"]) == landing["reference_frames"]
        assert landing["reference_errors"][0] == [0, None]  # the first frame: nothing to measure against
        assert len(landing["gated_at"]) == landing["gated_frames"] and len(landing["ms_trace"]) == 12
        assert 0 <= landing["skip_equal_share"] <= 1
    assert [p["setting_trace"] for p in sweep] == [[0.0] * 12, [0.5] * 12, [0.9] * 12]
    assert all([index for index, _ in p["reference_errors"]] == [0, 4, 8] for p in sweep)
    assert figures["gate"]["gated_frames"] >= 0 and figures["gate"] is not None
    assert figures["gated_frames"] == 0  # the run without the gate


def test_run_with_the_gate_reports_its_knob_and_gated_frames(tiny, tmp_path):
    model, clip = tiny
    summary_path = tmp_path / "summary.json"
    assert main(["run", str(model), str(clip), "--gate", "--summary", str(summary_path)]) == 0
    summary = json.loads(summary_path.read_text())
    assert summary["gate"]["schedule"][0] == [0.0, 0.0, 0.0] and summary["gate"]["threshold"] > 0
    assert 0 <= summary["gated_frames"] < summary["frames"] and "plan_switches" in summary


def test_best_point_within_the_budget_counts_frames_over_the_det_limit():
    from deluceva.bench.compare import best_within

    points = [{"percentage": 0.0, "speedup": 1.0, "error_mean": 0.0, "frames_within_limit": 1.0},
              {"percentage": 0.7, "speedup": 1.2, "error_mean": 0.015, "frames_within_limit": 0.97},
              {"percentage": 0.8, "speedup": 1.4, "error_mean": 0.019, "frames_within_limit": 0.90},
              {"percentage": 0.9, "speedup": 1.9, "error_mean": 0.05, "frames_within_limit": 0.5}]
    assert best_within(points, 0.02, det=True)["percentage"] == 0.7  # 0.8: 10% of frames over det 0.1
    assert best_within(points, 0.02, det=False)["percentage"] == 0.8
    assert best_within(points[1:], 0.01, det=False) is None


def test_learned_controller_trained_on_the_video_stops_at_the_pis_ceiling(tiny, monkeypatch):
    """A learned controller trained on the first frames never goes past the p where they are over
    CLIFF x the budget (the PI's ceiling)."""
    import deluceva.playback.calibration as calibration
    from deluceva.playback.setup import RunOptions, build_plans, prepare

    found = []
    measure = calibration.starting_range
    # Every plan kept: which are slower than dense is the machine's say (all of them, under load).
    monkeypatch.setattr(calibration, "retire_slow_plans", lambda plans, frames: [1.0] * len(plans.sessions))
    monkeypatch.setattr(calibration, "starting_range", lambda *a, **k: found.append(measure(*a, **k)) or found[-1])
    model, clip = tiny
    setup = prepare(RunOptions(str(model), str(clip), controller="learned", error_budget=0.002))
    build_plans(setup, announce=lambda text: None)
    # (The ceiling measured as the controller was made: the engine's per-frame choice of form
    # makes a second measurement differ in the last digits, on either side of a cliff.)
    assert len(found) == 1 and found[0].cliff is not None  # the budget is tight enough for a cliff
    found = found[0]
    assert setup.controller.p_max == pytest.approx(max(setup.controller.step, found.ceiling))
    assert setup.controller.grid.max() <= setup.controller.p_max + 1e-9


def test_compare_on_runs_with_known_figures():
    """compare()'s figures against numbers worked out by hand for two frames."""
    from deluceva.bench.baseline import OnnxruntimeRun
    from deluceva.bench.compare import DelucevaRun, compare
    from deluceva.playback.loop import FrameResult

    ort_run = OnnxruntimeRun(ms=[10.0, 20.0], store={}, names=[], memory_mib=40.0, folder=None)
    results = [FrameResult(0, None, 0.004, True, None, 0.5, 1.0, 100.0),
               FrameResult(1, None, 0.008, False, None, 0.7, 0.2, 20.0)]
    summary = {"flop_reduction_bound": 4.0, "density_mean": 0.6, "reference_frames": 1}
    delta_run = DelucevaRun(results, errors=[0.0, 0.1], memory_mib=100.0, plans=None, summary=summary,
                            paired_ms=[12.0, 18.0])
    figures = compare(ort_run, delta_run)
    assert figures["timing"] == "in blocks of 8 frames" and figures["onnxruntime_ms_mean"] == 15.0  # paired times
    assert figures["deluceva_ms_mean"] == pytest.approx(6.0) and figures["speedup"] == pytest.approx(2.5)
    assert figures["efficiency"] == pytest.approx(0.625)  # 2.5x of a 4x bound
    assert figures["error_mean"] == pytest.approx(0.05) and figures["error_max"] == 0.1
    assert figures["percentage_mean"] == pytest.approx(0.6) and figures["memory_ratio"] == pytest.approx(2.5)
    # A landed point's traces; without a gate's setting, the setting is the frame's p.
    from deluceva.bench.compare import point

    landed = point(ort_run, delta_run)
    assert landed["setting_trace"] == [0.5, 0.7] and landed["reference_errors"] == [[0, None]]
    assert landed["ms_trace"] == [4.0, 8.0] and landed["onnxruntime_ms_trace"] == [12.0, 18.0]
    assert landed["gated_at"] == []


def test_paired_onnxruntime_runs_each_block_after_deluceva():
    """The paired baseline runs the frames deluceva has just run, a block at a time (each
    evicting the other's working set every frame is not what a user's machine sees), the last
    block short; each call timed on its own, one time per frame, in frame order."""
    from deluceva.bench.baseline import OnnxruntimeRun
    from deluceva.bench.compare import run_deluceva
    from deluceva.playback.loop import FrameResult

    calls = []

    class Runner:
        plans = SessionsByPercentage.__new__(SessionsByPercentage)

        def step(self, tensor):
            calls.append(("deluceva", int(tensor[0])))
            return FrameResult(int(tensor[0]), [int(tensor[0])], 0.001, False, None, 0.0, 1.0, 1.0)

    Runner.plans.sessions, Runner.plans.percentages, Runner.plans.flops = [], [0.0], []
    Runner.plans.variant_counts, Runner.plans.step_forms = lambda: [{}], lambda: {}
    reference = OnnxruntimeRun(ms=[1.0] * 7, store={}, names=[], memory_mib=None, folder=None)
    reference.outputs = lambda index: [index]
    frames = [np.full(2, i, np.float32) for i in range(7)]
    # Each frame's error is against onnxruntime's outputs for that same frame: 0 where they match.
    run = run_deluceva(Runner, frames, reference, lambda ours, theirs: float(ours[0] != theirs[0]), block=3,
                       paired=lambda tensor: calls.append(("onnxruntime", int(tensor[0]))))
    ours = [("deluceva", i) for i in range(7)]
    theirs = [("onnxruntime", i) for i in range(7)]
    assert calls == ours[:3] + theirs[:3] + ours[3:6] + theirs[3:6] + ours[6:] + theirs[6:]
    assert len(run.paired_ms) == 7 and run.errors == [0.0] * 7


def test_demo_with_threads_times_onnxruntime_alone():
    """With 2 threads the demo's baseline is onnxruntime's own pass, not a session interleaved
    with deluceva's (they slow each other): every row is beside that same pass."""
    from deluceva.demo import run_demo

    rows = run_demo(frames=6, threads=2)
    assert [row["name"] for row in rows][:2] == ["onnxruntime", "deluceva p=0"]
    besides = {row["beside"] for row in rows[1:]}
    assert len(besides) == 1 and rows[0]["ms_per_frame"] == pytest.approx(besides.pop())
    assert rows[1]["error_max"] < 1e-3  # p = 0 is exact


def test_demo_prints_table(capsys):
    assert main(["demo", "--frames", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith("deluceva") else ""): line for line in lines[2:]}
    assert "onnxruntime" in rows and "deluceva p=0" in rows
    exact = rows["deluceva p=0"].split()
    assert float(exact[-1]) < 1e-3  # p = 0 is exact


# -- end to end on real models and videos (slow) -------------------------------------------


CASES = [
    # model, video, preset, metric, frames
    # Enough frames that the controllers' start (from p = 0) does not dominate the mean error.
    ("yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4", "yolox", "det", 300),
    ("yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "yunet", "rel-l2", 150),
    ("mtcnn_pnet_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi", "mtcnn", "rel-l2", 150),
]


@pytest.mark.slow
@pytest.mark.parametrize("controller", ["fixed", "pi", "learned"])
@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_end_to_end(shared_data, tmp_path, controller, case):
    name, video_name, preset, metric, frames = case
    model, video = shared_data / "models" / name, shared_data / "videos" / video_name
    summary_path = tmp_path / "summary.json"
    # learned: without --learned-model, trained on the video's first frames through the run's plans.
    extra = ["--percentage", "0.3"] if controller == "fixed" else []
    code = main(["run", str(model), str(video), "--preset", preset, "--metric", metric, "--controller", controller,
                 "--frames", str(frames), "--reference-every", "10", "--summary", str(summary_path), *extra])
    assert code == 0
    summary = json.loads(summary_path.read_text())
    assert SUMMARY_FIELDS <= set(summary)
    assert summary["frames"] == frames and summary["metric"] == metric
    assert summary["reference_frames"] >= frames // 10
    assert len(summary["percentage_trace"]) == frames
    assert all(0.0 <= p < 1.0 for p in summary["percentage_trace"])
    assert all(0.0 <= d <= 1.0 for d in summary["density_trace"])
    if controller != "fixed":  # a fixed p promises no error; the controllers hold the budget
        assert summary["error_mean"] <= summary["budget"]


def test_change_statistics_counts_changed_tiles():
    from deluceva.playback.loop import change_statistics

    rng = np.random.default_rng(0)
    before = rng.random((1, 3, 64, 80), dtype=np.float32)
    after = before.copy()
    after[..., 10:26, 33:40] += 0.5  # rows 10..25 -> tile rows 1..3; cols 33..39 -> tile col 4
    stats = change_statistics(after, before)
    assert stats["changed_tiles"] == pytest.approx(3 / (8 * 10))
    assert stats["mean_abs_change"] == pytest.approx(0.5 * 16 * 7 / (64 * 80), rel=0.5)
    assert change_statistics(before, before)["changed_tiles"] == 0.0
    assert change_statistics(before, None)["changed_tiles"] == 1.0


def test_frame_change_measures_against_the_frame_kept():
    """A run keeps every frame, frame skipping only those that ran: either way each measurement
    is `change_statistics` against the frame last kept, though only its subsample is kept."""
    from deluceva.playback.gate import FrameChange
    from deluceva.playback.loop import change_statistics

    rng = np.random.default_rng(3)
    frames = [rng.random((1, 3, 40, 56), dtype=np.float32)]
    for _ in range(8):
        frame = frames[-1].copy()
        row, column = rng.integers(0, 5), rng.integers(0, 7)
        frame[..., row * 8:row * 8 + 8, column * 8:column * 8 + 8] += rng.random()
        frames.append(frame)
    for kept in ([True] * 9, [True, False, False, True, False, True, True, False, False]):
        change, last = FrameChange(), None
        for frame, keep in zip(frames, kept):
            assert change.measure(frame) == change_statistics(frame, last)
            if keep:
                change.keep(frame)
                last = frame
    change = FrameChange()
    change.keep(frames[0])  # kept without being measured first
    assert change.measure(frames[3]) == change_statistics(frames[3], frames[0])


def test_calibration_samples_fit_a_learned_controller(tiny, tmp_path):
    from deluceva.controller import LearnedController, make_controller
    from deluceva.planner import load_model
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.playback.calibration import calibration_samples
    from deluceva.session import Session

    model_path, clip = tiny
    model = load_model(str(model_path))
    pre = Preprocessor.for_model(model.input_shape)
    frames = [pre(rgb) for rgb in open_video(clip)]
    plans = SessionsByPercentage([Session(model, plan="delta")], [0.0])
    samples = calibration_samples(plans, _rel_l2, frames, percentages=(0.0, 0.5, 0.9), reference_every=2)
    assert len(samples) == 3 * 5  # frames 2, 4, ..., 10 at each percentage
    assert {s.percentage for s in samples} == {0.0, 0.5, 0.9}
    assert max(s.error for s in samples if s.percentage == 0.0) < 1e-4
    LearnedController(budget=0.05).fit(samples).to_json(tmp_path / "learned.json")
    assert 0.0 <= make_controller("learned", learned_path=tmp_path / "learned.json").update(samples[0]) < 1.0


def test_learned_controller_without_a_file_is_trained_on_the_first_frames(tiny, tmp_path, capsys):
    model, clip = tiny
    summary = tmp_path / "s.json"
    assert main(["run", str(model), str(clip), "--plan", "delta", "--controller", "learned",
                 "--reference-every", "3", "--summary", str(summary)]) == 0
    err = capsys.readouterr().err
    assert "training the learned controller on the first 12 frames" in err
    data = json.loads(summary.read_text())
    assert data["controller"] == "learned" and len(data["percentage_trace"]) == 12


def test_profile_saves_a_learned_controller_that_run_loads(tiny, tmp_path, capsys):
    from deluceva.controller import LearnedController

    model, clip = tiny
    controller = tmp_path / "controller.json"
    assert main(["profile", str(model), "--video", str(clip), "--frames", "12", "--percentages", "0", "0.8",
                 "-o", str(tmp_path / "p.json"), "--controller-out", str(controller)]) == 0
    assert "learned controller:" in capsys.readouterr().out
    loaded = LearnedController.from_json(controller)
    assert loaded.model is not None and loaded.budget == 0.05
    assert main(["run", str(model), str(clip), "--plan", "delta", "--controller", "learned",
                 "--learned-model", str(controller)]) == 0
    assert "training" not in capsys.readouterr().err


@pytest.mark.parametrize("preset, model, video", [
    ("yolox", "yolox_nano_coco_416.onnx", "intersection_cctv_640x480_909f.mp4"),
    ("yunet", "yunet_face_dynamic.onnx", "overhead_pedestrians_1280x720_341f.avi"),
])
def test_run_writes_detections_in_the_videos_pixels(shared_data, tmp_path, capsys, preset, model, video):
    """Each line of --detections holds the preset's decoded boxes of that frame's outputs (as
    --outputs stored them), mapped to the source frame's pixels; frames and timestamps in order."""
    from deluceva.media.preprocess import Preprocessor
    from deluceva.media.video import open_video
    from deluceva.presets import get_decoder, preprocessing

    jsonl, npz = tmp_path / "d.jsonl", tmp_path / "o.npz"
    assert main(["run", str(shared_data / "models" / model), str(shared_data / "videos" / video), "--preset", preset,
                 "--plan", "dense", "--controller", "fixed", "--frames", "4", "--detections", str(jsonl),
                 "--outputs", str(npz)]) == 0
    capsys.readouterr()
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    reader = open_video(shared_data / "videos" / video, frames=4)
    pre = Preprocessor.for_model((1, 3, None, None) if preset == "yunet" else (1, 3, 416, 416), preprocessing(preset))
    shape = pre.input_shape((reader.height, reader.width))
    from deluceva.planner import load_model

    names = load_model(shared_data / "models" / model, shape).output_names
    decoder = get_decoder(preset, shape, names)
    with np.load(npz) as stored:
        outputs = [[stored[name][i] for name in names] for i in range(4)]
    assert [line["frame"] for line in lines] == [0, 1, 2, 3]
    assert [line["time"] for line in lines] == sorted(line["time"] for line in lines) and lines[1]["time"] > 0
    found = 0
    for line, frame_outputs in zip(lines, outputs):
        want = decoder(frame_outputs)
        boxes = pre.to_frame(want.boxes, (reader.height, reader.width))
        np.testing.assert_allclose(line["boxes"], boxes.reshape(-1, 4), atol=0.01)
        assert line["classes"] == want.classes.tolist()
        assert all(0 <= b[0] <= b[2] <= reader.width and 0 <= b[1] <= b[3] <= reader.height for b in line["boxes"])
        found += len(line["boxes"])
    assert found > 0  # the frames hold detections: the comparison is not of empty lists


def test_detections_need_a_detection_preset(tiny, tmp_path, capsys):
    model, clip = tiny
    assert main(["run", str(model), str(clip), "--plan", "dense", "--detections", str(tmp_path / "d.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "--detections needs a preset that decodes detections" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.jsonl").exists()


def test_a_loaded_learned_controller_also_stops_at_the_pis_ceiling_and_starts_below_its_start(tiny, tmp_path,
                                                                                              monkeypatch):
    """--learned-model: the saved controller gets the same ceiling and start on this video as one
    trained on it (before, it ran from p = 0 with no ceiling)."""
    import deluceva.playback.calibration as calibration
    from deluceva.playback.setup import RunOptions, build_plans, prepare

    model, clip = tiny
    saved = tmp_path / "controller.json"
    assert main(["profile", str(model), "--video", str(clip), "--frames", "12", "--percentages", "0", "0.8",
                 "-o", str(tmp_path / "p.json"), "--controller-out", str(saved)]) == 0
    found = []
    measure = calibration.starting_range
    monkeypatch.setattr(calibration, "retire_slow_plans", lambda plans, frames: [1.0] * len(plans.sessions))
    monkeypatch.setattr(calibration, "starting_range", lambda *a, **k: found.append(measure(*a, **k)) or found[-1])
    setup = prepare(RunOptions(str(model), str(clip), controller="learned", learned_model=str(saved),
                               error_budget=0.002))
    build_plans(setup, announce=lambda text: None)
    assert len(found) == 1 and found[0].cliff is not None  # the budget is tight enough for a cliff
    assert setup.controller.p_max == pytest.approx(max(setup.controller.step, found[0].ceiling))
    assert setup.start_percentage <= found[0].start
    assert setup.controller.state.percentage == setup.start_percentage


def test_learned_controller_starts_at_its_median_choice_but_not_above_the_calibrated_start():
    """A run with a learned controller starts where it would choose for the first frames' changes
    (not on the all-dense plan, which would hold it there until the first reference), capped
    where the calibration frames put a PI's start."""
    from deluceva.controller.learned import LearnedState
    from deluceva.playback.setup import _learned_start

    class Choosing:
        def __init__(self, answers):
            self.answers, self.state, self.seen = iter(answers), LearnedState(), []

        def choose(self, observation):
            self.seen.append(observation.changed_tiles)
            return next(self.answers)

    frames = [np.full((1, 3, 16, 16), k, np.float32) for k in range(6)]  # five changes
    controller = Choosing([0.5, 0.7, 0.6, 0.9, 0.6])
    assert _learned_start(controller, frames, 0.95) == 0.6 and controller.state.percentage == 0.6
    assert len(controller.seen) == 5 and min(controller.seen) > 0  # each change's statistics
    capped = Choosing([0.8] * 5)
    assert _learned_start(capped, frames, 0.3) == 0.3 and capped.state.percentage == 0.3
