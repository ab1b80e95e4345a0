"""`deluceva streams`: many sources through a pool of workers, each as `deluceva run` runs one;
faults stay in their stream, and a killed worker's stream resumes where its outputs end."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from deluceva.cli import main
from deluceva.demo import build_demo_model
from deluceva.errors import DelucevaError
from deluceva.media.video import synthesise_clip
from deluceva.playback.setup import RunOptions
from deluceva.streams.pool import Stream, StreamFiles, read_sources, run_streams


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """The demo CNN at 32x48 and three different 96x64 clips of 40 frames."""
    folder = tmp_path_factory.mktemp("streams")
    model = folder / "tiny.onnx"
    onnx.save(build_demo_model(32, 48), model)
    videos = [synthesise_clip(folder / f"cam{i}.mp4", width=96, height=64, frames=40, seed=i) for i in range(3)]
    return model, videos


def _load(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def _exact_options(model, **more):
    return ["--model", str(model), "--plan", "delta", "--controller", "fixed", "--percentage", "0", *more]


def _exact_run_options(model) -> RunOptions:
    """`_exact_options` as the library takes them: all delta at p = 0 (outputs are onnxruntime's)."""
    return RunOptions(model=str(model), video="", plan="delta", controller="fixed", percentage=0.0)


def _kill_worker_once(after_frames: int):
    """(an on_event callback that SIGKILLs the worker once, at its stream's frame `after_frames`,
    the list of the frame counts it killed at)."""
    killed = []

    def kill_once(kind, state):
        if kind == "frame" and not killed and state.frames >= after_frames:
            killed.append(state.frames)
            os.kill(state.worker, signal.SIGKILL)

    return kill_once, killed


# -- sources ---------------------------------------------------------------------------------


def test_read_sources_names_and_lists(tmp_path):
    listing = tmp_path / "cams.txt"
    listing.write_text("# car park\nnorth=rtsp://10.0.0.5/live\n\n/videos/south.mp4\n/other/south.mp4\n")
    streams = read_sources([str(listing), "http://host/cam/gate.m3u8"])
    assert streams == [Stream("north", "rtsp://10.0.0.5/live"), Stream("south", "/videos/south.mp4"),
                       Stream("south_2", "/other/south.mp4"), Stream("gate", "http://host/cam/gate.m3u8")]
    assert streams[0].live and not streams[1].live


@pytest.mark.parametrize("text, message", [
    ("a=x.mp4\na=y.mp4\n", "stream name 'a' is used twice"),
    ("# nothing\n", "no sources given"),
    ("a=\n", "no source after the name"),
])
def test_read_sources_refuses(tmp_path, text, message):
    listing = tmp_path / "cams.txt"
    listing.write_text(text)
    with pytest.raises(DelucevaError, match=message):
        read_sources([str(listing)])
    with pytest.raises(DelucevaError, match="cannot read the list of sources"):
        read_sources([str(tmp_path / "missing.txt")])


# -- the pool --------------------------------------------------------------------------------


def test_streams_equal_run_at_p0_with_more_streams_than_workers(clips, tmp_path):
    model, videos = clips
    assert main(["streams", *map(str, videos), "--out", str(tmp_path / "out"), "--workers", "2", "--outputs",
                 *_exact_options(model)]) == 0
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["failed"] == [] and report["frames"] == 120 and report["workers"] == 2
    for video in videos:
        name = video.stem
        run_out = tmp_path / f"{name}.npz"
        assert main(["run", str(model), str(video), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                     "--outputs", str(run_out)]) == 0
        got, want = _load(tmp_path / "out" / name / "outputs.npz"), _load(run_out)
        assert set(got) == set(want) == {"heads", "coarse"}
        for key in want:
            assert got[key].shape == want[key].shape and np.array_equal(got[key], want[key])
        summary = json.loads((tmp_path / "out" / name / "summary.json").read_text())
        assert summary["frames"] == summary["frames_written"] == 40 and summary["stream"] == name


def test_killed_worker_resumes_after_its_last_written_frame(clips, tmp_path):
    """SIGKILL of the worker mid-stream: it is replaced, the stream resumes at the first frame
    without output, every frame is written once, and at p = 0 the outputs are onnxruntime's."""
    model, videos = clips
    video = videos[0]
    kill_once, killed = _kill_worker_once(12)
    options = _exact_run_options(model)
    report = run_streams([Stream("cam", str(video))], options, tmp_path / "out", StreamFiles(outputs=True),
                         workers=1, retries=2, on_event=kill_once)
    assert killed and report.failed == []
    row = report.streams[0]
    assert row["restarts"] == 1 and "died" in row["problems"][0] and row["frames"] == 40
    summary = json.loads((tmp_path / "out" / "cam" / "summary.json").read_text())
    assert summary["first_frame"] >= 12  # resumed, not run again from the start
    # The summary covers every frame, those before the resume included (from frames.jsonl).
    assert summary["frames_written"] == summary["frames"] == 40 and len(summary["ms_trace"]) == 40
    assert len((tmp_path / "out" / "cam" / "frames.jsonl").read_text().splitlines()) == 40
    # Every frame exactly once, each equal to onnxruntime on the same input.
    run_out = tmp_path / "run.npz"
    assert main(["run", str(model), str(video), "--plan", "dense", "--outputs", str(run_out), "--save-inputs"]) == 0
    inputs = _load(run_out)["input:image"]
    got = _load(tmp_path / "out" / "cam" / "outputs.npz")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert got["heads"].shape[0] == len(inputs) == 40
    for index, x in enumerate(inputs):
        for name, want in zip(names, session.run(None, {"image": x})):
            error = np.linalg.norm(got[name][index] - want) / np.linalg.norm(want)
            assert error < 1e-5, (index, name, error)


def test_a_bad_source_fails_alone_and_quickly(clips, tmp_path, capsys):
    model, videos = clips
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    listing = tmp_path / "cams.txt"
    listing.write_text(f"good={videos[1]}\nclosed=rtsp://127.0.0.1:9/x\nbroken={corrupt}\n")
    began = time.perf_counter()
    code = main(["streams", str(listing), "--out", str(tmp_path / "out"), "--workers", "2", "--retries", "1",
                 *_exact_options(model)])
    assert time.perf_counter() - began < 60
    assert code == 2
    err = capsys.readouterr().err
    assert "2 of 3 streams failed: closed, broken" in err
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = {row["name"]: row for row in report["streams"]}
    assert rows["good"]["status"] == "done" and rows["good"]["frames"] == 40
    assert rows["closed"]["status"] == "failed" and "unreachable" in rows["closed"]["problems"][-1]
    assert rows["broken"]["status"] == "failed" and str(corrupt) in rows["broken"]["problems"][-1]
    assert rows["closed"]["attempts"] == 2  # tried again once, after a second
    assert all("\n" not in problem for row in rows.values() for problem in row["problems"])


def test_streams_refuses_bad_options(clips, tmp_path, capsys):
    model, videos = clips
    (tmp_path / "file").write_text("")
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "file"), *_exact_options(model)]) == 2
    assert "must be a folder" in capsys.readouterr().err
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none.onnx")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "o"), "--retries", "-1", *_exact_options(model)]) == 2
    assert "must not be negative" in capsys.readouterr().err
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "o"), "--model", str(model),
                 "--plan", str(tmp_path / "none.plan.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.plan.json: no such --plan file")


def _streams_command(model, videos, out, *more):
    import sys

    return [sys.executable, "-m", "deluceva.cli", "streams", *map(str, videos), "--out", str(out), "--workers", "2",
            "--outputs", *_exact_options(model), *more]


def _check_every_file_at_one_frame(folder):
    """outputs.npz (every array), frames.jsonl and summary.json agree on the frames written."""
    arrays = {key: len(value) for key, value in _load(folder / "outputs.npz").items()}
    log = len((folder / "frames.jsonl").read_text().splitlines())
    summary = json.loads((folder / "summary.json").read_text())
    assert set(arrays.values()) == {log} == {summary["frames_written"]} == {summary["frames"]}, (folder, arrays, log)
    return log


@pytest.fixture(scope="module")
def long_clips(clips, tmp_path_factory):
    """The demo CNN and three 500-frame clips: long enough for a signal to land mid-stream."""
    folder = tmp_path_factory.mktemp("long")
    return clips[0], [synthesise_clip(folder / f"long{i}.mp4", width=96, height=64, frames=500, seed=20 + i)
                      for i in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_signal_to_the_process_group_then_resume_writes_every_frame_once(long_clips, tmp_path, seed):
    """`deluceva streams` stopped by SIGINT or SIGTERM sent to its whole process group at a
    random moment: each stream's files end at the same frame, the run's summary counts what they
    hold and marks them interrupted (not failed), the table prints; the same command is then
    refused, and with --resume each stream goes on where its files end, so every frame is
    written once and equals a clean run's."""
    import random
    import subprocess

    model, videos = long_clips
    rng = random.Random(seed)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(_streams_command(model, videos, out), env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("*/frames.jsonl")) and time.monotonic() < deadline:  # a stream is under way
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.5))
    os.killpg(process.pid, rng.choice([signal.SIGINT, signal.SIGTERM]))
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130, err
    assert "frames/s" in err and "with --resume" in err and "Traceback" not in err, err
    report = json.loads((out / "summary.json").read_text())
    assert report["interrupted"] and report["failed"] == []
    written = {}
    for row in report["streams"]:
        if (out / row["name"] / "summary.json").exists():
            written[row["name"]] = _check_every_file_at_one_frame(out / row["name"])
        assert row["frames"] == written.get(row["name"], 0), (row, written)
        assert row["status"] in ("interrupted", "not started", "done")
    assert report["frames"] == sum(written.values())
    again = subprocess.run(_streams_command(model, videos, out), env=env, capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--resume" in again.stderr
    resumed = subprocess.run(_streams_command(model, videos, out, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    for name, count in written.items():
        if 0 < count < 500:
            assert f"{name}: resuming after frame {count - 1}" in resumed.stderr
    clean = tmp_path / "clean"
    assert main(["streams", *map(str, videos), "--out", str(clean), "--workers", "2", "--outputs",
                 *_exact_options(model)]) == 0
    assert any(0 < count < 500 for count in written.values())  # the signal landed mid-stream
    for video in videos:
        assert _check_every_file_at_one_frame(out / video.stem) == 500
        got, want = _load(out / video.stem / "outputs.npz"), _load(clean / video.stem / "outputs.npz")
        for key in want:  # a resumed stream's first frame is a keyframe: exact to float rounding
            assert got[key].shape == want[key].shape
            errors = [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got[key], want[key])]
            assert max(errors) < 1e-5, (video.stem, key, int(np.argmax(errors)), max(errors))


def test_overwrite_starts_again_and_resume_of_a_finished_run_runs_nothing(clips, tmp_path, capsys):
    model, videos = clips
    out = tmp_path / "out"
    common = ["streams", str(videos[0]), "--out", str(out), "--outputs", *_exact_options(model)]
    assert main([*common, "--frames", "10"]) == 0
    assert main(common) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # one or the other
        main([*common, "--resume", "--overwrite"])
    assert refused.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert main([*common, "--overwrite"]) == 0
    assert _check_every_file_at_one_frame(out / videos[0].stem) == 40
    assert "resuming" not in capsys.readouterr().err
    assert main([*common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming after frame 39" in err
    summary = json.loads((out / videos[0].stem / "summary.json").read_text())
    assert summary["frames"] == 40 and summary["first_frame"] == 0  # the finished run's summary, kept


@pytest.mark.parametrize("where, message", [
    ("file/sub", "cannot make the --out folder"),
    ("/proc/deluceva-nowhere", "cannot make the --out folder"),
    ("in-the-way", "cannot make stream"),
])
def test_an_out_that_cannot_be_made_is_refused_in_one_line(clips, tmp_path, capsys, where, message):
    model, videos = clips
    (tmp_path / "file").write_text("")
    (tmp_path / "in-the-way").mkdir()
    (tmp_path / "in-the-way" / videos[0].stem).write_text("")  # a file where the stream's folder goes
    out = where if where.startswith("/") else str(tmp_path / where)
    assert main(["streams", str(videos[0]), "--out", out, *_exact_options(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_a_stream_cannot_take_the_runs_summary_name(clips, tmp_path, capsys):
    model, videos = clips
    listing = tmp_path / "cams.txt"
    listing.write_text(f"summary.json={videos[0]}\n")
    assert main(["streams", str(listing), "--out", str(tmp_path / "out"), *_exact_options(model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is the run's own summary.json" in err
    copy = tmp_path / "summary.json.mp4"  # a name made from the file: renamed
    copy.write_bytes(videos[0].read_bytes())
    assert read_sources([str(copy)]) == [Stream("summary.json_2", str(copy))]


def test_a_dead_worker_does_not_spend_the_sources_retries(clips, tmp_path):
    """--retries 0: the source gets no second try, but a killed worker's stream still resumes."""
    model, videos = clips
    kill_once, killed = _kill_worker_once(8)
    options = _exact_run_options(model)
    report = run_streams([Stream("cam", str(videos[0]))], options, tmp_path / "out", StreamFiles(outputs=True),
                         workers=1, retries=0, on_event=kill_once)
    assert killed and report.failed == [] and report.streams[0]["frames"] == 40
    assert report.streams[0]["restarts"] == 1 and "died" in report.streams[0]["problems"][0]
    assert _check_every_file_at_one_frame(tmp_path / "out" / "cam") == 40


def test_a_stream_reports_its_pace_with_and_without_setup_and_saves_inputs(clips, tmp_path, capsys):
    model, videos = clips
    out = tmp_path / "out"
    assert main(["streams", str(videos[0]), "--out", str(out), "--outputs", "--save-inputs",
                 *_exact_options(model)]) == 0
    err = capsys.readouterr().err
    assert "frames/s" in err and "with set-up" in err
    row = json.loads((out / "summary.json").read_text())["streams"][0]
    summary = json.loads((out / videos[0].stem / "summary.json").read_text())
    assert row["frames_per_second"] == pytest.approx(1000 / summary["ms_per_frame_mean"])
    assert row["frames_per_second_with_setup"] < row["frames_per_second"]  # set-up counts in the second only
    assert _load(out / videos[0].stem / "outputs.npz")["input:image"].shape[0] == 40
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "o2"), "--save-inputs",
                 *_exact_options(model)]) == 2
    assert "add --outputs" in capsys.readouterr().err


class _Events:
    def __init__(self):
        self.sent = []

    def send(self, message):
        self.sent.append(message)


def test_a_workers_next_stream_reuses_its_model_and_plans(clips, tmp_path, monkeypatch):
    """Two streams through one worker's `_run_stream`: the model is loaded and the sessions
    (graph, kernels, onnxruntime sessions) built for the first only; the second still gets its
    own calibration and a keyframe first, so its outputs equal a fresh `run`'s exactly."""
    import deluceva.planner
    import deluceva.session
    from deluceva.streams import pool

    model, videos = clips
    monkeypatch.setattr(pool, "_MODELS", {})
    monkeypatch.setattr(pool, "_PLANS", {})
    loads, sessions = [], []
    real_load, real_init = deluceva.planner.load_model, deluceva.session.Session.__init__
    monkeypatch.setattr(deluceva.planner, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    def init(self, *args, **kwargs):
        sessions.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(deluceva.session.Session, "__init__", init)
    options = _exact_run_options(model)
    out = tmp_path / "out"
    summaries = []
    for video in videos[:2]:
        (out / video.stem).mkdir(parents=True)
        summaries.append(pool._run_stream(Stream(video.stem, str(video)), False, 0, options, out,
                                          StreamFiles(outputs=True), _Events()))
    assert len(loads) == 1 and len(sessions) == 1
    assert [s["plans_reused"] for s in summaries] == [False, True]
    run_out = tmp_path / "run.npz"
    monkeypatch.undo()
    assert main(["run", str(model), str(videos[1]), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--outputs", str(run_out)]) == 0
    got, want = _load(out / videos[1].stem / "outputs.npz"), _load(run_out)
    for key in want:
        assert np.array_equal(got[key], want[key]), key


@pytest.mark.slow
def test_a_killed_worker_leaves_no_leaked_semaphore_warning(long_clips, tmp_path):
    """Plans compiled on the fly (the profiler shows a bar in the worker), the worker killed:
    stderr holds deluceva's lines only, no resource tracker warning."""
    import subprocess
    import sys

    model, videos = long_clips
    out = tmp_path / "out"
    command = [sys.executable, "-m", "deluceva.cli", "streams", str(videos[0]), "--model", str(model), "--controller",
               "fixed", "--percentage", "0", "--out", str(out)]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": os.getcwd()}, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list(out.glob("*/frames.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 20:
            break
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    worker = next(pid for pid in workers if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(int(worker), signal.SIGKILL)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 0 and "died" in err, err
    assert "leaked" not in err and "Warning" not in err, err


def test_reused_plans_count_their_forms_from_zero(clips):
    """build_plans(plans=...) resets each session and zeroes its dense/delta form counts, so a
    worker's next stream's summary counts its own frames only."""
    from deluceva.playback.loop import SessionsByPercentage
    from deluceva.playback.setup import build_plans, prepare
    from deluceva.session import Session

    model, videos = clips
    options = RunOptions(model=str(model), video=str(videos[0]), plan="delta", controller="fixed", percentage=0.0)
    setup = prepare(options)
    plans = SessionsByPercentage([Session(setup.model, plan="delta", dense_forms="always")], [0.0])
    build_plans(setup, announce=lambda text: None, plans=plans)
    session = plans.sessions[0]
    for frame in setup.calibration_frames:
        session.run(frame)
    assert sum(c["delta"] + c["dense"] for c in plans.step_forms().values()) > 0
    build_plans(prepare(options), announce=lambda text: None, plans=plans)
    assert plans.step_forms() and all(c == {"delta": 0, "dense": 0} for c in plans.step_forms().values())


# -- real detector (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_streams_detections_equal_run_detections(shared_data, tmp_path):
    """Two YOLOX-nano streams: each detections.jsonl is what `run --detections` writes for it."""
    model = shared_data / "models" / "yolox_nano_coco_416.onnx"
    videos = [shared_data / "videos" / "intersection_cctv_640x480_909f.mp4",
              shared_data / "videos" / "overhead_pedestrians_1280x720_341f.avi"]
    common = ["--preset", "yolox", "--plan", "delta", "--controller", "fixed", "--percentage", "0", "--frames", "12"]
    assert main(["streams", *map(str, videos), "--model", str(model), "--out", str(tmp_path / "out"), *common]) == 0
    for video in videos:
        run_lines = tmp_path / f"{video.stem}.jsonl"
        assert main(["run", str(model), str(video), *common, "--detections", str(run_lines)]) == 0
        got = [json.loads(line) for line in (tmp_path / "out" / video.stem / "detections.jsonl").read_text().splitlines()]
        want = [json.loads(line) for line in run_lines.read_text().splitlines()]
        assert len(got) == 12 and got == want
        assert sum(len(line["boxes"]) for line in got) > 0


def test_bench_streams_reports_both_sides(clips, tmp_path, capsys):
    model, videos = clips
    out = tmp_path / "bench.json"
    assert main(["bench-streams", str(model), str(videos[0]), "--plan", "delta", "--controller", "fixed",
                 "--percentage", "0", "--streams", "1,2", "--json", str(out)]) == 0
    assert "rel-l2 error" in capsys.readouterr().err.splitlines()[0]  # the error column names its metric
    report = json.loads(out.read_text())
    assert [row["streams"] for row in report["rows"]] == [1, 2] and report["machine"]["cores"] >= 1
    for row in report["rows"]:
        assert row["deluceva_frames_per_second"] > 0 and row["onnxruntime_frames_per_second"] > 0
        assert row["ratio"] == pytest.approx(row["deluceva_frames_per_second"] / row["onnxruntime_frames_per_second"])
        assert row["error_mean"] < 1e-5  # p = 0: the streams' reference frames measure no error


def test_bench_streams_help_describes_it_in_whole_sentences(capsys):
    with pytest.raises(SystemExit):
        main(["bench-streams", "--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.rstrip().endswith("processes.") and "aggregate" in description


@pytest.mark.slow
def test_bench_streams_measures_the_ray_actors_too(clips, tmp_path):
    ray = pytest.importorskip("ray")
    model, videos = clips
    out = tmp_path / "bench.json"
    try:
        assert main(["bench-streams", str(model), str(videos[0]), "--plan", "delta", "--controller", "fixed",
                     "--percentage", "0", "--streams", "1", "--ray", "--json", str(out)]) == 0
    finally:
        ray.shutdown()
    row = json.loads(out.read_text())["rows"][0]
    assert row["ray_frames_per_second"] > 0
    assert row["ray_ratio"] == pytest.approx(row["ray_frames_per_second"] / row["onnxruntime_frames_per_second"])


def test_streams_that_start_together_need_a_worker_each(clips, tmp_path):
    model, videos = clips
    options = RunOptions(model=str(model), video="", plan="delta")
    with pytest.raises(DelucevaError, match="need a worker each"):
        run_streams([Stream("a", str(videos[0])), Stream("b", str(videos[1]))], options, tmp_path, workers=1, together=True)


# -- Ray -------------------------------------------------------------------------------------


def test_ray_missing_is_refused_in_one_line(clips, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    model, videos = clips
    assert main(["streams", str(videos[0]), "--out", str(tmp_path / "o"), "--ray", *_exact_options(model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == 'deluceva: error: --ray needs Ray, an optional extra: pip install "deluceva[ray]" (or pip install ray)'


@pytest.mark.slow
def test_ray_streams_with_more_streams_than_cpus_survive_a_killed_actor(clips, tmp_path_factory, tmp_path):
    """Three streams on a local 2-CPU Ray cluster (two actors: none left unscheduled); the actor
    running one is killed mid-stream, Ray restarts it, and the stream resumes: every stream's
    outputs equal `run`'s at p = 0."""
    ray = pytest.importorskip("ray")
    from deluceva.streams.on_ray import run_streams_on_ray

    model, _ = clips
    folder = tmp_path_factory.mktemp("ray")
    # long0 runs for seconds, so the kill (on progress that comes every 0.2 s) lands mid-stream
    lengths = (600, 150, 150)
    videos = [synthesise_clip(folder / f"long{i}.mp4", width=96, height=64, frames=n, seed=10 + i)
              for i, n in enumerate(lengths)]
    before = _actor_folders()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killed = []

        def kill_once(kind, state):
            if kind == "frame" and state.stream.name == "long0" and not killed and state.frames >= 30:
                killed.append(state.frames)
                ray.kill(state.worker, no_restart=False)

        options = _exact_run_options(model)
        streams = [Stream(v.stem, str(v)) for v in videos]
        report = run_streams_on_ray(streams, options, tmp_path / "out", StreamFiles(outputs=True), retries=2,
                                    on_event=kill_once)
    finally:
        ray.shutdown()
    assert killed and report.failed == [] and report.workers == 2
    assert _actor_folders() <= before  # every actor's copy of the model removed, the killed one's included
    rows = {row["name"]: row for row in report.streams}
    assert rows["long0"]["restarts"] == 1 and "actor died" in rows["long0"]["problems"][0]
    assert json.loads((tmp_path / "out" / "long0" / "summary.json").read_text())["first_frame"] >= 30
    for video, length in zip(videos, lengths):
        run_out = tmp_path / f"{video.stem}.npz"
        assert main(["run", str(model), str(video), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                     "--outputs", str(run_out)]) == 0
        got, want = _load(tmp_path / "out" / video.stem / "outputs.npz"), _load(run_out)
        for key in want:  # a resumed stream's first frame is a keyframe: exact to float rounding
            assert got[key].shape == want[key].shape == (length, *want[key].shape[1:])
            errors = [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got[key], want[key])]
            assert max(errors) < 1e-5, (video.stem, key, int(np.argmax(errors)), max(errors))


def _actor_folders():
    import tempfile

    from deluceva.streams.on_ray import ACTOR_FOLDER_PREFIX

    return set(Path(tempfile.gettempdir()).glob(f"{ACTOR_FOLDER_PREFIX}*"))


@pytest.mark.slow
def test_ray_interrupt_writes_what_was_finished_quietly_and_resume_completes(long_clips, tmp_path):
    """Ctrl-C (SIGINT to the process group) of `streams --ray`: each stream's outputs.npz is
    packed (no .parts left), its summary written, the run's summary counts every written frame;
    only deluceva's lines are printed; no actor folder is left; --resume finishes every frame once."""
    pytest.importorskip("ray")
    import subprocess

    model, videos = long_clips
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    before = _actor_folders()
    command = _streams_command(model, videos, out, "--ray")
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum(len(p.read_text().splitlines()) for p in out.glob("*/frames.jsonl")) >= 50:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert all(line.startswith(("deluceva", "stream ")) or line.split()[0] in {v.stem for v in videos}
               or "frames in" in line for line in lines), err  # no Ray start-up, no core_worker lines
    report = json.loads((out / "summary.json").read_text())
    assert report["interrupted"] and report["failed"] == []
    written = 0
    for row in report["streams"]:
        folder = out / row["name"]
        assert not (folder / "outputs.npz.parts").exists()
        count = _check_every_file_at_one_frame(folder) if (folder / "summary.json").exists() else 0
        assert row["frames"] == count
        written += count
    assert 50 <= written < 1500 and report["frames"] == written
    assert _actor_folders() <= before
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after frame" in resumed.stderr
    for video in videos:
        assert _check_every_file_at_one_frame(out / video.stem) == 500
    assert _actor_folders() <= before


@pytest.mark.slow
def test_ray_two_node_cluster_loses_a_node_and_its_streams_resume_on_the_other(clips, tmp_path_factory, tmp_path):
    """A head and a second node on this host (two raylets, one CPU each, as Ray's own tests make
    them); four streams spread over both; the second node is removed mid-run (its raylet ended).
    The lost node's stream resumes on the head, every frame is written once, and every stream's
    outputs equal `run`'s at p = 0."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from deluceva.streams.on_ray import run_streams_on_ray

    model, _ = clips
    folder = tmp_path_factory.mktemp("cluster")
    lengths = (1500, 1500, 300, 300)
    videos = [synthesise_clip(folder / f"c{i}.mp4", width=96, height=64, frames=n, seed=30 + i)
              for i, n in enumerate(lengths)]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = cluster.add_node(num_cpus=1)
    removed = []
    try:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        assert ray.cluster_resources()["CPU"] == 2

        def remove_second_node(kind, state):
            running = [s for s in seen.values() if s.status == "running" and s.frames >= 30]
            seen[state.stream.name] = state
            if kind == "frame" and not removed and len(running) >= 2:
                removed.append({s.stream.name: s.frames for s in running})
                cluster.remove_node(second, allow_graceful=False)

        seen = {}
        options = _exact_run_options(model)
        streams = [Stream(v.stem, str(v)) for v in videos]
        report = run_streams_on_ray(streams, options, tmp_path / "out", StreamFiles(outputs=True), retries=0,
                                    on_event=remove_second_node)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert removed and report.failed == [] and report.workers == 2, report.to_dict()
    rows = {row["name"]: row for row in report.streams}
    lost = [name for name, row in rows.items() if row["restarts"]]
    assert len(lost) == 1 and "its node was lost" in rows[lost[0]]["problems"][0], rows
    summary = json.loads((tmp_path / "out" / lost[0] / "summary.json").read_text())
    assert summary["first_frame"] >= 30 and summary["frames"] == summary["frames_written"]
    for video, length in zip(videos, lengths):
        assert _check_every_file_at_one_frame(tmp_path / "out" / video.stem) == length
        run_out = tmp_path / f"{video.stem}.npz"
        assert main(["run", str(model), str(video), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                     "--outputs", str(run_out)]) == 0
        got, want = _load(tmp_path / "out" / video.stem / "outputs.npz"), _load(run_out)
        for key in want:
            assert got[key].shape == want[key].shape == (length, *want[key].shape[1:])
            errors = [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got[key], want[key])]
            assert max(errors) < 1e-5, (video.stem, key, int(np.argmax(errors)), max(errors))


# -- late frames -----------------------------------------------------------------------------


def test_late_frames_are_those_the_wall_clock_has_passed_by_more_than_allowed():
    from deluceva.playback.job import LateFrames

    times = iter([10.0, 10.5, 11.0, 13.0, 13.1, 13.2])
    late = LateFrames(1.0, clock=times.__next__)
    # wall 0, 0.5, 1, 3, 3.1, 3.2 s after the first frame for frame times 0, 1, 2, 0.5, 4, 6:
    # lags 0, -0.5, -1, 2.5, -0.9, -2.8; only the 2.5 is over 1 s
    assert [late.late(t) for t in (0.0, 1.0, 2.0, 0.5, 4.0, 6.0)] == [False, False, False, True, False, False]
    assert late.dropped == 1
    assert LateFrames(0.5, clock=iter([0.0, 9.0]).__next__).late(None) is False  # no timestamp, never late
    with pytest.raises(DelucevaError, match="at least 0"):
        LateFrames(-1.0)


def test_a_run_that_falls_behind_drops_late_frames_and_counts_them(clips, tmp_path):
    """A 25 fps clip processed at about 12 frames/s with --drop-late 0.2: frames are skipped, the
    summary counts them, and each detection line would carry its source frame's number."""
    from deluceva.playback.job import RunFiles, run_video
    from deluceva.playback.setup import build_plans, prepare

    model, videos = clips
    setup = prepare(RunOptions(model=str(model), video=str(videos[0]), plan="delta", controller="fixed", percentage=0.0))
    plans = build_plans(setup, announce=lambda text: None)
    job = run_video(setup, plans, RunFiles(outputs=str(tmp_path / "o.npz"), drop_late=0.2),
                    on_frame=lambda result: time.sleep(0.08))
    dropped = job.summary["dropped_frames"]
    assert 5 < dropped < 40 and job.summary["frames"] + dropped == 40
    assert _load(tmp_path / "o.npz")["heads"].shape[0] == job.summary["frames"]
    setup = prepare(RunOptions(model=str(model), video=str(videos[0]), plan="delta", controller="fixed", percentage=0.0))
    assert "dropped_frames" not in run_video(setup, plans, RunFiles()).summary  # off by default: every frame runs


def test_a_live_source_resumes_at_its_current_frame_and_counts_what_it_missed(clips, tmp_path_factory, tmp_path):
    """A stream over HTTP is live (never sought): after its worker is killed it starts again
    where the source is now, and the frames that went by while it was down are estimated from
    the frame rate and counted."""
    import functools
    import http.server
    import threading

    model, _ = clips
    folder = tmp_path_factory.mktemp("served")
    synthesise_clip(folder / "live.mp4", width=96, height=64, frames=120, seed=7)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kill_once, killed = _kill_worker_once(20)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/live.mp4"
        options = _exact_run_options(model)
        report = run_streams([Stream("cam", url)], options, tmp_path / "out", StreamFiles(outputs=True), workers=1,
                             retries=1, on_event=kill_once)
    finally:
        server.shutdown()
    row = report.streams[0]
    assert killed and report.failed == [] and row["restarts"] == 1
    assert row["frames_missed"] >= 25  # down for at least the 1 s backoff, at 25 frames/s
    summary = json.loads((tmp_path / "out" / "cam" / "summary.json").read_text())
    # not sought: the whole source again from where it is, after the frames written before
    assert summary["first_frame"] >= 20 and summary["frames"] == summary["first_frame"] + 120
    assert _load(tmp_path / "out" / "cam" / "outputs.npz")["heads"].shape[0] == summary["first_frame"] + 120
