"""Error metrics: relative L2, NMS and F1 matching, and the detection decoders on hand-made heads."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deluceva.errors import DelucevaError
from deluceva.metrics import DEFAULT_BUDGETS, detection_error, get_metric, rel_l2
from deluceva.presets.detections import Detections, match_f1, nms
from deluceva.presets.mtcnn import PnetDecoder
from deluceva.presets.yolox import YoloxDecoder
from deluceva.presets.yunet import YunetDecoder


def test_rel_l2_is_the_worst_output():
    ref = [np.ones((2, 3)), np.full(4, 2.0)]
    out = [np.ones((2, 3)) * 1.1, np.full(4, 2.0)]
    assert rel_l2(out, ref) == pytest.approx(0.1)
    assert rel_l2(ref, ref) == 0.0
    assert rel_l2({"a": out[0], "b": out[1]}, {"a": ref[0], "b": ref[1]}) == pytest.approx(0.1)


def test_rel_l2_zero_reference_is_finite():
    assert rel_l2([np.zeros(5)], [np.zeros(5)]) == 0.0
    assert math.isfinite(rel_l2([np.full(5, 1e-3)], [np.zeros(5)]))
    assert rel_l2([np.full(5, 1e-3)], [np.zeros(5)]) > 100


def test_rel_l2_mismatch_refused():
    with pytest.raises(DelucevaError):
        rel_l2([np.ones(3)], [np.ones(3), np.ones(3)])
    with pytest.raises(DelucevaError, match="shape"):
        rel_l2([np.ones(3)], [np.ones(4)])


def test_nms_keeps_best_per_cluster_and_per_class():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    assert nms(boxes, scores, 0.5, classes=np.array([0, 0, 0, 1])).tolist() == [0, 2, 3]


def _dets(boxes, classes=None, scores=None):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return Detections(boxes, np.asarray(scores if scores is not None else np.linspace(0.9, 0.5, n)),
                      np.asarray(classes if classes is not None else np.zeros(n, int)))


def test_f1_identical_disjoint_and_partial():
    a = _dets([[0, 0, 10, 10], [20, 20, 30, 30]])
    assert match_f1(a, a) == 1.0
    far = _dets([[100, 100, 110, 110], [200, 200, 210, 210]])
    assert match_f1(a, far) == 0.0
    assert match_f1(Detections.empty(), Detections.empty()) == 1.0
    assert match_f1(a, Detections.empty()) == 0.0
    # One of two matches (IoU 0.68 >= 0.5), the other is shifted off (IoU < 0.5): F1 = 0.5.
    moved = _dets([[1, 1, 11, 11], [26, 26, 36, 36]])
    assert match_f1(moved, a) == pytest.approx(0.5)
    # Same box, other class: no match.
    assert match_f1(_dets([[0, 0, 10, 10]], classes=[3]), _dets([[0, 0, 10, 10]], classes=[4])) == 0.0
    # A reference box matches once: two found boxes on it give F1 = 2*1/(2+1).
    assert match_f1(_dets([[0, 0, 10, 10], [0, 0, 10, 10]]), _dets([[0, 0, 10, 10]])) == pytest.approx(2 / 3)


def _yolox_raw(objects, input_hw=(416, 416), classes=80):
    """A raw YOLOX head with background everywhere and the given (x1, y1, x2, y2, class, score)."""
    decoder = YoloxDecoder(input_hw=input_hw)
    anchors = sum((input_hw[0] // s) * (input_hw[1] // s) for s in (8, 16, 32))
    cells, strides = decoder.grids(anchors)
    raw = np.zeros((1, anchors, 5 + classes), np.float32)
    raw[0, :, 4] = 0.01
    raw[0, :, 5:] = 0.02
    for x1, y1, x2, y2, cls, score in objects:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        stride = 8 if max(w, h) < 64 else 16 if max(w, h) < 128 else 32
        at = np.flatnonzero((strides == stride) & (cells[:, 0] == int(cx // stride)) & (cells[:, 1] == int(cy // stride)))[0]
        raw[0, at, :4] = [cx / stride - cells[at, 0], cy / stride - cells[at, 1], np.log(w / stride), np.log(h / stride)]
        raw[0, at, 4] = 1.0
        raw[0, at, 5 + cls] = score
        # A weaker duplicate on the neighbouring cell: NMS must remove it.
        raw[0, at + 1, :] = raw[0, at, :]
        raw[0, at + 1, 0] -= 1.0
        raw[0, at + 1, 4] = 0.9
    return raw


def test_yolox_decoder_finds_known_boxes():
    objects = [(40, 60, 80, 100, 2, 0.9), (200, 100, 300, 260, 0, 0.8), (10, 300, 30, 340, 5, 0.5)]
    found = YoloxDecoder()([_yolox_raw(objects)])
    assert len(found) == 3
    order = np.argsort(-found.scores)
    assert found.classes[order].tolist() == [2, 0, 5]
    assert np.allclose(found.boxes[order], [o[:4] for o in objects], atol=1e-3)
    assert np.allclose(found.scores[order], [0.9, 0.8, 0.5], atol=1e-6)
    # Below the 0.3 threshold: nothing. The square size is inferred from 3549 anchors.
    assert len(YoloxDecoder()([_yolox_raw([(40, 60, 80, 100, 2, 0.25)])])) == 0


def test_yolox_non_square_input_and_bad_shape():
    objects = [(40, 60, 80, 100, 1, 0.9)]
    found = YoloxDecoder(input_hw=(256, 416))([_yolox_raw(objects, (256, 416))])
    assert len(found) == 1 and np.allclose(found.boxes[0], objects[0][:4], atol=1e-3)
    with pytest.raises(DelucevaError, match="do not match"):
        YoloxDecoder(input_hw=(256, 416))([_yolox_raw(objects)])
    with pytest.raises(DelucevaError, match="yolox decoder expects"):
        YoloxDecoder()([np.zeros((1, 10))])


def test_detection_error_identical_disjoint():
    a = _yolox_raw([(40, 60, 80, 100, 2, 0.9), (200, 100, 300, 260, 0, 0.8)])
    b = _yolox_raw([(300, 300, 340, 340, 2, 0.9)])
    decoder = YoloxDecoder()
    assert len(decoder([a])) == 2  # identical outputs that hold detections, not two empty ones
    assert detection_error([a], [a], decoder) == 0.0
    assert detection_error([b], [a], decoder) == 1.0
    empty = _yolox_raw([])
    assert detection_error([empty], [empty], decoder) == 0.0
    # One of two objects lost: F1 = 2/3.
    one = _yolox_raw([(40, 60, 80, 100, 2, 0.9)])
    assert detection_error([one], [a], decoder) == pytest.approx(1 / 3)


def _yunet_outputs(faces, hw=(96, 128)):
    """YuNet heads (dict by name) holding the given (x1, y1, x2, y2, score) faces at stride 8."""
    h, w = hw
    out = {}
    for s in (8, 16, 32):
        n = (h // s) * (w // s)
        out[f"cls_{s}"] = np.full((1, n, 1), 0.3, np.float32)
        out[f"obj_{s}"] = np.full((1, n, 1), 0.1, np.float32)
        out[f"bbox_{s}"] = np.zeros((1, n, 4), np.float32)
        out[f"kps_{s}"] = np.zeros((1, n, 10), np.float32)
    cols = w // 8
    for x1, y1, x2, y2, score in faces:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        c, r = int(cx // 8), int(cy // 8)
        at = r * cols + c
        out["cls_8"][0, at] = score
        out["obj_8"][0, at] = score
        out["bbox_8"][0, at] = [cx / 8 - c, cy / 8 - r, np.log((x2 - x1) / 8), np.log((y2 - y1) / 8)]
    return out


def test_yunet_decoder_finds_known_faces():
    faces = [(10, 20, 30, 44, 0.95), (70, 50, 100, 80, 0.7), (60, 5, 70, 15, 0.5)]
    outputs = _yunet_outputs(faces)
    found = YunetDecoder(input_hw=(96, 128))(outputs)
    assert len(found) == 2  # 0.5 is under the 0.6 threshold
    order = np.argsort(-found.scores)
    assert np.allclose(found.boxes[order], [f[:4] for f in faces[:2]], atol=1e-3)
    assert np.allclose(found.scores[order], [0.95, 0.7], atol=1e-6)
    # A list in the ONNX file's order decodes the same.
    names = [f"{k}_{s}" for k in ("cls", "obj", "bbox", "kps") for s in (8, 16, 32)]
    listed = YunetDecoder(input_hw=(96, 128))([outputs[n] for n in names])
    assert np.allclose(listed.boxes, found.boxes)
    with pytest.raises(DelucevaError, match="do not match input"):
        YunetDecoder(input_hw=(64, 128))(outputs)


def test_pnet_decoder():
    prob = np.zeros((1, 2, 10, 12), np.float32)
    prob[0, 1, 3, 4] = 0.9
    prob[0, 1, 3, 5] = 0.8  # overlapping window, suppressed
    prob[0, 1, 8, 1] = 0.4  # under threshold
    reg = np.zeros((1, 4, 10, 12), np.float32)
    found = PnetDecoder()([reg, prob])
    assert len(found) == 1 and np.allclose(found.boxes[0], [8, 6, 20, 18])


def test_get_metric():
    metric = get_metric("rel-l2")
    assert metric.budget == DEFAULT_BUDGETS["rel-l2"] == 0.05
    assert metric([np.ones(3)], [np.ones(3) * 2]) == pytest.approx(0.5)
    det = get_metric("det", "yolox")
    assert det.budget == 0.02
    a = _yolox_raw([(40, 60, 80, 100, 2, 0.9)])
    assert det([a], [a]) == 0.0
    yunet = get_metric("det", "yunet", input_shape=(1, 3, 96, 128))
    outputs = _yunet_outputs([(10, 20, 30, 44, 0.95)])
    assert yunet(outputs, outputs) == 0.0
    with pytest.raises(DelucevaError, match="metric det needs a preset that decodes detections"):
        get_metric("det", None)
    with pytest.raises(DelucevaError, match="metric det needs a preset"):
        get_metric("det", "generic")
    with pytest.raises(DelucevaError, match="unknown metric 'l1'"):
        get_metric("l1", "yolox")


def test_decoders_on_the_shared_models(shared_data):
    import onnxruntime as ort

    from deluceva.presets import preprocessing
    from deluceva.media.video import open_video

    session = ort.InferenceSession(str(shared_data / "models" / "yolox_nano_coco_416.onnx"))
    frames = list(open_video(shared_data / "videos" / "intersection_cctv_640x480_909f.mp4", frames=3, every=100))
    metric = get_metric("det", "yolox", input_shape=(1, 3, 416, 416))
    for frame in frames:
        outputs = session.run(None, {"images": preprocessing("yolox")(frame)})
        found = metric.decoder(outputs)
        # A busy intersection: a few cars (2) and people (0) in every sampled frame.
        assert 3 <= len(found) <= 40 and {0, 2} & set(found.classes.tolist())
        assert metric(outputs, outputs) == 0.0
