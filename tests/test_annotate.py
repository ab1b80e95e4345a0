"""`run --annotate OUT.mp4` / `streams --annotate`: the video with each frame's boxes, class and
score drawn, written as the run goes (a killed run keeps all but its last second)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest

from deluceva.cli import main
from deluceva.media.preprocess import Preprocessor
from deluceva.media.video import synthesise_clip
from deluceva.playback.annotate import FONT, AnnotationWriter, draw_detections, draw_text
from deluceva.presets.detections import Detections
from test_generic_det import _box_detector


def decoded(path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_text_is_drawn_from_the_bitmap_font():
    image = np.zeros((9, 20, 3), np.uint8)
    draw_text(image, "7a", 1, 1, (255, 0, 0))
    assert np.array_equal(image[1:8, 1:6, 0] > 0, FONT["7"]) and np.array_equal(image[1:8, 7:12, 0] > 0, FONT["A"])
    assert not image[..., 1:].any()
    draw_text(image, "?", 17, 5, (0, 255, 0), scale=2)  # clipped at the edges, no error
    assert image[5:, 17:, 1].any()


def test_boxes_outlined_and_labelled_in_the_class_colour():
    image = np.full((100, 160, 3), 128, np.uint8)
    draw_detections(image, np.array([[40, 30, 100, 80]]), np.array([0.87]), np.array([3]), names=None)
    colour = image[30, 70]
    assert not np.array_equal(colour, [128, 128, 128])
    assert all(np.array_equal(image[y, x], colour) for x, y in ((40, 55), (41, 55), (100, 55), (99, 55), (70, 80),
                                                               (40, 30)))
    assert np.array_equal(image[55, 70], [128, 128, 128])  # inside the box: untouched
    label = image[30 - 9:30, 40:40 + 6 * 6]  # "3 0.87" above the box, on the colour
    assert (label != colour).any(axis=2).sum() > 20  # the glyphs' ink
    assert draw_detections(np.zeros((8, 8, 3), np.uint8), np.zeros((0, 4)), [], []).sum() == 0


def _frames(count, h=64, w=96):
    rng = np.random.default_rng(4)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(count)]


class _Fixed:
    """A decoder that finds one box, whatever the outputs."""

    def __call__(self, outputs):
        return Detections(np.array([[10.0, 10.0, 50.0, 40.0]]), np.array([0.9]), np.array([1]))


def test_writer_resumes_with_the_frames_already_drawn(tmp_path):
    path = tmp_path / "a.mp4"
    writer = AnnotationWriter(path, _Fixed(), Preprocessor(), (64, 96), fps=10)
    for rgb in _frames(5):
        writer.add(rgb, None)
    writer.close()
    writer = AnnotationWriter(path, _Fixed(), Preprocessor(), (64, 96), fps=10, resume=True, frames=4)
    for rgb in _frames(3):
        writer.add(rgb, None)
    writer.close()
    assert len(decoded(path)) == 4 + 3
    assert not path.with_name("a.mp4.previous").exists()


def test_a_killed_run_keeps_what_it_drew(tmp_path):
    """Killed without closing (os._exit, as SIGKILL): the fragments already written play."""
    path = tmp_path / "killed.mp4"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import numpy as np
        from deluceva.media.preprocess import Preprocessor
        from deluceva.playback.annotate import AnnotationWriter
        from deluceva.presets.detections import Detections
        decode = lambda outputs: Detections(np.array([[10.0, 10.0, 50.0, 40.0]]), np.array([0.9]), np.array([1]))
        writer = AnnotationWriter({str(path)!r}, decode, Preprocessor(), (64, 96), fps=10)
        rng = np.random.default_rng(0)
        for _ in range(25):
            writer.add(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8), None)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert len(decoded(path)) >= 20  # a keyframe a second (10 frames): all but the last second


@pytest.fixture
def detector(tmp_path):
    model = tmp_path / "det.onnx"
    known = _box_detector(model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=192, height=128, frames=6, seed=1)
    return model, clip, known * 2  # the clip is twice the model's 96x64 input


def test_run_annotates_every_frame(detector, tmp_path):
    model, clip, boxes = detector
    out = tmp_path / "annotated.mp4"
    assert main(["run", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--boxes", "boxes", "--scores", "scores", "--annotate", str(out)]) == 0
    drawn, source = decoded(out), decoded(clip)
    assert len(drawn) == len(source) == 6
    changed = np.abs(drawn[2].astype(int) - source[2].astype(int)).sum(axis=2) > 60
    x1, y1, x2, y2 = (int(v) for v in boxes[1])  # the box at (80, 20)-(160, 100)
    assert changed[70:90, x1 - 1:x1 + 3].any(axis=1).all() and changed[70:90, x2 - 2:x2 + 2].any(axis=1).all()
    assert changed[60:92, 88:112].mean() < 0.02  # inside it, clear of the other boxes: the video itself


def test_annotate_refused_without_detections_or_with_a_bad_suffix(detector, tmp_path, capsys):
    model, clip, _ = detector
    assert main(["run", str(model), str(clip), "--plan", "dense", "--annotate", str(tmp_path / "a.mp4")]) == 2
    assert "--annotate needs a preset that decodes detections" in capsys.readouterr().err
    assert main(["run", str(model), str(clip), "--plan", "dense", "--boxes", "boxes", "--scores", "scores",
                 "--annotate", str(tmp_path / "a.gif")]) == 2
    assert "--annotate file must end in .mp4 or .mkv or .mov" in capsys.readouterr().err


def test_streams_annotate_one_video_per_stream(detector, tmp_path):
    model, clip, _ = detector
    out, second = tmp_path / "out", tmp_path / "second.mp4"
    second.write_bytes(clip.read_bytes())
    assert main(["streams", str(clip), str(second), "--model", str(model), "--out", str(out), "--workers", "1",
                 "--plan", "delta", "--controller", "fixed", "--percentage", "0", "--boxes", "boxes",
                 "--scores", "scores", "--annotate"]) == 0
    for name in ("clip", "second"):
        assert len(decoded(out / name / "annotated.mp4")) == 6
        assert (out / name / "detections.jsonl").read_text().count("\n") == 6


def test_labels_name_the_presets_classes():
    from deluceva.presets import DetectorOptions, class_names

    assert class_names("yolox")[:3] == ["person", "bicycle", "car"] and len(class_names("yolox")) == 80
    assert class_names("yunet") == ("face",)
    assert class_names("yolox", DetectorOptions(boxes="b", scores="s")) is None  # generic: class numbers
    image = np.zeros((60, 120, 3), np.uint8)
    draw_detections(image, np.array([[10, 20, 100, 50]]), [0.5], [0], names=class_names("yolox"))
    expected = np.zeros((7, 35, 3), np.uint8)
    draw_text(expected, "PERSON", 0, 0, (1, 1, 1))
    ink = (image[12:19, 11:46] != image[11, 10]).any(axis=2)  # label box from (10, 11); text 1 pixel in
    assert np.array_equal(ink, expected[..., 0] > 0)
