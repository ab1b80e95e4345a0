"""Video input: generated clips in several containers, sampling options, and refused bad input."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from deluceva.errors import DelucevaError
from deluceva.media.video import open_video, synthesise_clip, synthetic_frames, write_test_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return synthesise_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=96, height=64, frames=30, seed=3)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".avi", "mpeg4"), (".mkv", "ffv1")])
def test_round_trip_in_several_containers(tmp_path, suffix, codec):
    source = list(synthetic_frames(64, 48, frames=12, seed=1))
    path = write_test_clip(tmp_path / f"c{suffix}", source, fps=20, codec=codec)
    video = open_video(path)
    assert (video.width, video.height) == (64, 48)
    assert video.fps == pytest.approx(20)
    frames = list(video)
    assert len(frames) == 12
    assert all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in frames)
    # Lossy codecs stay close to what went in; the lossless one is nearly exact (YUV rounding).
    limit = 2.0 if codec == "ffv1" else 8.0
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(frames, source)]) < limit


def test_synthetic_frames_are_deterministic_and_mostly_static():
    a = list(synthetic_frames(80, 64, frames=10, seed=7))
    b = list(synthetic_frames(80, 64, frames=10, seed=7))
    c = list(synthetic_frames(80, 64, frames=10, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    changed = [(np.abs(a[i + 1].astype(int) - a[i]) > 12).mean() for i in range(9)]
    assert 0 < np.median(changed) < 0.3


def test_start_every_frames(clip):
    everything = list(open_video(clip))
    assert len(everything) == 30
    video = open_video(clip, start=5, every=3, frames=4)
    assert video.frame_count == 30 and video.expected == 4
    got = list(video)
    assert len(got) == 4
    for k, frame in enumerate(got):
        assert np.array_equal(frame, everything[5 + 3 * k])
    # Without a frame limit, `every` runs to the end: frames 20, 27.
    tail = list(open_video(clip, start=20, every=7))
    assert len(tail) == 2 and np.array_equal(tail[1], everything[27])
    assert open_video(clip, start=20, every=7).expected == 2


def test_iterating_twice_reopens(clip):
    video = open_video(clip, frames=3)
    assert len(list(video)) == 3 and len(list(video)) == 3


@pytest.mark.parametrize("kwargs,word", [
    (dict(frames=0), "frames"), (dict(frames=-2), "frames"), (dict(start=-1), "start"),
    (dict(every=0), "every"), (dict(start=30), "past the last frame"), (dict(timeout=0), "timeout"),
])
def test_options_out_of_range(clip, kwargs, word):
    with pytest.raises(DelucevaError, match=word):
        open_video(clip, **kwargs)


def test_missing_file(tmp_path):
    with pytest.raises(DelucevaError, match=r"nothere\.mp4: no such file"):
        open_video(tmp_path / "nothere.mp4")


@pytest.mark.parametrize("content", [b"hello, this is text\n" * 50, b"\x08\x07\x12\x04onnx" + bytes(500)])
def test_not_a_video(tmp_path, content):
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(DelucevaError, match="fake.mp4: not a video") as err:
        open_video(path)
    assert "\n" not in str(err.value)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(DelucevaError, match="empty file"):
        open_video(tmp_path / "empty.mp4")
    with pytest.raises(DelucevaError, match="directory"):
        open_video(tmp_path)


def test_truncated_mp4_without_index_is_refused(tmp_path, clip):
    # The default mp4 writes its index (moov) last: cutting the file loses it.
    data = clip.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DelucevaError, match="cut.mp4: MP4/MOV file is truncated or damaged"):
        open_video(path)


def test_truncated_mp4_yields_the_decodable_frames(tmp_path):
    # With the index first (faststart), a cut file still opens; decoding fails part way.
    # Noisy frames make every frame large, so the cut lands mid-stream.
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(40)]
    whole = write_test_clip(tmp_path / "whole.mp4", frames, options={"movflags": "+faststart"})
    data = whole.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) // 2])
    video = open_video(path)
    assert video.frame_count == 40
    with pytest.warns(RuntimeWarning, match="cut.mp4: truncated or damaged"):
        got = list(video)
    assert 5 < len(got) < 40 and video.truncated and video.frames_read == len(got)
    reference = list(open_video(whole, frames=len(got)))
    assert all(np.array_equal(a, b) for a, b in zip(got, reference))


def test_truncated_mp4_with_nothing_decodable(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(10)]
    whole = write_test_clip(tmp_path / "whole.mp4", frames, options={"movflags": "+faststart"})
    data = whole.read_bytes()
    header = data.index(b"mdat") + 4 + 100  # the index plus a few bytes of the first frame
    path = tmp_path / "stub.mp4"
    path.write_bytes(data[:header])
    with pytest.raises(DelucevaError, match="stub.mp4"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            list(open_video(path))


def test_stream_that_cannot_be_opened_fails_fast():
    start = time.perf_counter()
    with pytest.raises(DelucevaError, match=r"rtsp://127\.0\.0\.1:1/none: unreachable: 127\.0\.0\.1:1 \(Connection refused\)"):
        open_video("rtsp://127.0.0.1:1/none", timeout=1.0)
    assert time.perf_counter() - start < 5


def test_stream_url_reads_like_a_file(clip):
    # A file:// URL goes through the URL path (no local checks) and decodes the same frames.
    a = list(open_video(f"file://{clip}", frames=4))
    b = list(open_video(clip, frames=4))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_file_without_video_stream(tmp_path):
    import av

    path = tmp_path / "tone.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(DelucevaError, match="tone.wav: has no video stream"):
        open_video(path)


def test_shared_videos_open(shared_data):
    video = open_video(shared_data / "videos" / "overhead_pedestrians_1280x720_341f.avi", frames=2)
    # This AVI's index lists empty entries: 682 entries at 50 fps for 341 frames at 25 fps.
    assert (video.width, video.height, video.frame_count, video.fps) == (1280, 720, 341, 25)
    assert [f.shape for f in video] == [(720, 1280, 3)] * 2
