"""A frame's files are written as one step: a stop (SIGINT, SIGTERM) at any point of a frame's
writes leaves outputs, detection lines, frame log and summary at the same frame, and a resumed
run's summary covers every frame."""

from __future__ import annotations

import json
import os
import random
import signal

import numpy as np
import onnx
import pytest

from deluceva.demo import build_demo_model
from deluceva.files import GrowingNpy
from deluceva.media.video import synthesise_clip
from deluceva.playback import job as job_module
from deluceva.playback.job import HeldSignals, Interrupted, RunFiles, run_video
from deluceva.playback.recorder import JsonLines, written_frames
from deluceva.playback.setup import RunOptions, build_plans, prepare
from deluceva.presets.detections import Detections


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("writes")
    model = folder / "tiny.onnx"
    onnx.save(build_demo_model(32, 48), model)
    return model, synthesise_clip(folder / "cam.mp4", width=96, height=64, frames=30, seed=3)


def _decoder(input_shape=None, output_names=None):
    """A stand-in detection decoder for the demo model: one box from the outputs' means."""

    def decode(outputs):
        m = float(np.mean(outputs[0]))
        return Detections(np.array([[1.0, 2.0, 10.0 + m, 20.0]], np.float32), np.array([0.5], np.float32),
                          np.array([1]))

    return decode


def _setup(model, video, **more):
    options = RunOptions(model=str(model), video=str(video), plan="delta", controller="fixed", percentage=0.0, **more)
    setup = prepare(options)
    return setup, build_plans(setup, announce=lambda text: None)


def _files(folder, **more):
    return RunFiles(outputs=str(folder / "o.npz"), detections=str(folder / "d.jsonl"), summary=str(folder / "s.json"),
                   frame_log=str(folder / "f.jsonl"), **more)


def _counts(folder):
    with np.load(folder / "o.npz") as data:
        arrays = {key: len(data[key]) for key in data.files}
    lines = len((folder / "d.jsonl").read_text().splitlines())
    log = len((folder / "f.jsonl").read_text().splitlines())
    summary = json.loads((folder / "s.json").read_text())
    return arrays, lines, log, summary


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt


@pytest.mark.parametrize("seed", range(12))
def test_a_signal_at_any_point_of_a_frames_writes_leaves_every_file_at_the_same_frame(clip, tmp_path, monkeypatch,
                                                                                      seed):
    """The signal is sent from inside the writes (before or after an output's array, a detection
    line or a frame-log line) of a random frame; its handler runs at once, as a real signal's
    would. Before the writes were one step, outputs.npz ended a frame (or an array) ahead."""
    model, video = clip
    rng = random.Random(seed)
    number = rng.choice([signal.SIGINT, signal.SIGTERM])
    target_frame = rng.randrange(2, 25)
    point = rng.choice(["array0 before", "array0 after", "array1 before", "array1 after", "detection before",
                        "detection after", "log before", "log after"])
    monkeypatch.setattr("deluceva.presets.get_decoder", lambda *args: _decoder())
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    state = {"frame": 0, "array": 0, "sent": False}

    def maybe_send(where):
        if not state["sent"] and state["frame"] == target_frame and where == point:
            state["sent"] = True
            os.kill(os.getpid(), number)

    real_append, real_add = GrowingNpy.append, JsonLines.add

    def append(self, value):
        where = f"array{state['array']}"
        maybe_send(f"{where} before")
        real_append(self, value)
        maybe_send(f"{where} after")
        state["array"] += 1

    def add(self, record):
        where = "log" if self.path.name == "f.jsonl" else "detection"
        maybe_send(f"{where} before")
        real_add(self, record)
        maybe_send(f"{where} after")
        if where == "log":
            state["frame"], state["array"] = state["frame"] + 1, 0

    monkeypatch.setattr(GrowingNpy, "append", append)
    monkeypatch.setattr(JsonLines, "add", add)
    try:
        setup, plans = _setup(model, video)
        with pytest.raises(KeyboardInterrupt) as stopped:
            run_video(setup, plans, _files(tmp_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert state["sent"] and isinstance(stopped.value, Interrupted)
    arrays, lines, log, summary = _counts(tmp_path)
    assert set(arrays.values()) == {lines} == {log} == {summary["frames_written"]} == {summary["frames"]}
    assert lines == target_frame + 1  # the frame whose writes the signal hit is kept whole
    assert summary["interrupted"] and stopped.value.job.summary["frames_written"] == lines


def test_an_error_in_a_frames_writes_drops_that_frame_from_every_file(clip, tmp_path, monkeypatch):
    """A write that fails half-way through a frame (after its outputs, before its detection
    line): the frame is cut from the outputs too."""
    model, video = clip
    monkeypatch.setattr("deluceva.presets.get_decoder", lambda *args: _decoder())
    calls = {"n": 0}
    real_add = JsonLines.add

    def add(self, record):
        if self.path.name == "d.jsonl":
            calls["n"] += 1
            if calls["n"] == 8:
                raise RuntimeError("disk gone")
        real_add(self, record)

    monkeypatch.setattr(JsonLines, "add", add)
    setup, plans = _setup(model, video)
    with pytest.raises(RuntimeError):
        run_video(setup, plans, _files(tmp_path))
    arrays, lines, log, summary = _counts(tmp_path)
    assert set(arrays.values()) == {7} and lines == log == summary["frames_written"] == 7


def test_held_signals_run_the_handler_after_the_block_and_leave_ignored_signals_alone():
    seen = []
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # (not held: only SIGINT and SIGTERM are)
    old_term = signal.signal(signal.SIGTERM, lambda n, f: seen.append(("handled", n)))
    try:
        held = HeldSignals().install()
        with held:
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block done")
        held.restore()
        assert seen == ["block done", ("handled", signal.SIGTERM)]
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        held = HeldSignals().install()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # an ignored signal stays ignored
        held.restore()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGUSR1, previous)


def test_a_resumed_runs_summary_covers_every_frame(clip, tmp_path, monkeypatch):
    """Stopped at frame 12 then resumed: the summary's frames and traces cover all 30 frames,
    with the first part's figures as they were, and each file holds every frame once."""
    model, video = clip
    monkeypatch.setattr("deluceva.presets.get_decoder", lambda *args: _decoder())
    setup, plans = _setup(model, video)

    def stop_at_12(result):
        if result.index == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_video(setup, plans, _files(tmp_path), on_frame=stop_at_12)
    first = json.loads((tmp_path / "s.json").read_text())
    done = written_frames(tmp_path / "o.npz", tmp_path / "d.jsonl", tmp_path / "f.jsonl")
    assert done == first["frames_written"] == 12
    setup, plans = _setup(model, video, start=done)
    job = run_video(setup, plans, _files(tmp_path, resume=True, first_frame=done))
    arrays, lines, log, summary = _counts(tmp_path)
    assert set(arrays.values()) == {lines} == {log} == {30}
    assert summary["frames"] == summary["frames_written"] == 30 == job.summary["frames"]
    assert len(summary["ms_trace"]) == len(summary["percentage_trace"]) == 30
    assert summary["ms_trace"][:12] == first["ms_trace"]
    frames = [json.loads(line)["frame"] for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert frames == list(range(30))


def test_a_frame_log_that_is_not_one_is_refused_in_one_line(tmp_path):
    log = tmp_path / "f.jsonl"
    log.write_text('{"frame": 0}\n')
    with pytest.raises(job_module.DelucevaError, match="line 1 is not a frame's record"):
        job_module.read_frame_log(log, 1)
