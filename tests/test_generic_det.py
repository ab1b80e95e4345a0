"""Generic detections (`--boxes/--scores`, `--head yolov8`): decoding known boxes, refusing models
that do not fit, and YOLOX-nano with its decoding appended as ONNX nodes giving the same
detections as `--preset yolox`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.cli import main
from deluceva.errors import DelucevaError
from deluceva.media.video import synthesise_clip
from deluceva.metrics import get_metric
from deluceva.planner import load_model
from deluceva.presets import check_preset, get_decoder
from deluceva.presets.generic import DetectorOptions, GenericDecoder
from deluceva.presets.yolox import YoloxDecoder


# -- the decoder on known boxes ----------------------------------------------------------------


def _decode(outputs, **options):
    return GenericDecoder(DetectorOptions(**options), input_hw=(100, 200))(outputs)


def test_xyxy_boxes_best_class_threshold_and_nms():
    boxes = np.array([[10, 10, 50, 50], [12, 12, 50, 50], [100, 20, 150, 60], [0, 0, 5, 5]], np.float32)
    scores = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.4, 0.45]], np.float32)
    found = _decode({"b": boxes[None], "s": scores[None]}, boxes="b", scores="s")
    # Box 1 overlaps box 0 (same class, lower score): suppressed; box 3 is below 0.5.
    assert found.boxes.tolist() == [[10, 10, 50, 50], [100, 20, 150, 60]]
    assert found.classes.tolist() == [1, 0]
    assert np.allclose(found.scores, [0.9, 0.7])
    looser = _decode({"b": boxes, "s": scores}, boxes="b", scores="s", score_threshold=0.4, nms_iou=0.95)
    assert len(looser) == 4


@pytest.mark.parametrize("box_format, given", [
    ("xywh", [10, 20, 30, 40]),
    ("cxcywh", [25, 40, 30, 40]),
])
def test_box_formats(box_format, given):
    found = _decode({"b": np.array([given], np.float32), "s": np.array([0.9], np.float32)},
                    boxes="b", scores="s", box_format=box_format)
    assert found.boxes.tolist() == [[10, 20, 40, 60]]


def test_normalized_boxes_scale_to_the_input():
    found = _decode({"b": np.array([[0.1, 0.2, 0.5, 1.0]], np.float32), "s": np.array([[0.9]], np.float32)},
                    boxes="b", scores="s", normalized=True)
    assert np.allclose(found.boxes, [[20, 20, 100, 100]])  # input is 200 wide, 100 high


def test_background_class_is_never_a_class():
    scores = np.array([[0.95, 0.6, 0.1], [0.99, 0.3, 0.2]], np.float32)  # column 0: background
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    found = _decode({"b": boxes, "s": scores}, boxes="b", scores="s", background_class=0)
    assert found.classes.tolist() == [1] and found.boxes.tolist() == [[0, 0, 10, 10]]
    assert len(_decode({"b": boxes, "s": scores}, boxes="b", scores="s")) == 2  # without: background boxes


def test_yolov8_head():
    head = np.zeros((1, 4 + 3, 5), np.float32)
    head[0, :4, 2] = [30, 40, 20, 10]  # cx, cy, w, h
    head[0, 4 + 2, 2] = 0.8
    head[0, 4 + 1, 4] = 0.3  # below the threshold
    found = _decode({"out": head}, head="yolov8")
    assert found.boxes.tolist() == [[20, 35, 40, 45]] and found.classes.tolist() == [2]


@pytest.mark.parametrize("outputs, options, message", [
    ({"b": np.zeros((5, 5)), "s": np.zeros((5, 2))}, {}, "--boxes: output b has shape (5, 5)"),
    ({"b": np.zeros((5, 4)), "s": np.zeros((4, 2))}, {}, "--scores: output s has shape (4, 2)"),
    ({"b": np.zeros((5, 4)), "s": np.zeros((5, 2))}, {"background_class": 2}, "only 2 score columns"),
    ({"b": np.zeros((5, 4)), "s": np.zeros((5, 2))}, {"scores": "x"}, "--scores x: the model has no such output"),
    ({"out": np.zeros((1, 4, 8))}, {"head": "yolov8", "boxes": None, "scores": None}, "not 1 x (4 + classes) x N"),
])
def test_outputs_that_do_not_fit_are_named(outputs, options, message):
    with pytest.raises(DelucevaError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        _decode(outputs, **{"boxes": "b", "scores": "s", **options})


def test_options_refused_without_outputs():
    with pytest.raises(DelucevaError, match="both --boxes"):
        DetectorOptions(boxes="b")
    with pytest.raises(DelucevaError, match="--box-format"):
        DetectorOptions(boxes="b", scores="s", box_format="yxyx")


# -- a generated detector with known boxes, end to end ------------------------------------------


def _box_detector(path, size=(64, 96), n=6, classes=3, layout="boxes"):
    """A tiny model: one conv (the part deluceva filters), then constant boxes and scores that
    depend on the image only through a mean (so they stay as made), N x 4 and N x C."""
    h, w = size
    rng = np.random.default_rng(0)
    conv = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.1, "conv_w")
    boxes = np.array([[4, 4, 20, 30], [40, 10, 80, 50], [10, 30, 30, 60], [60, 5, 90, 25], [0, 0, 8, 8],
                      [50, 40, 70, 62]], np.float32)[:n]
    scores = np.full((n, classes), 0.05, np.float32)
    for i in range(n):
        scores[i, i % classes] = 0.9 if i < 4 else 0.2
    nodes = [
        helper.make_node("Conv", ["image", "conv_w"], ["feat"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["feat"], ["act"]),
        helper.make_node("ReduceMean", ["act"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["z"]),  # 0 x mean: boxes independent of the frame
        helper.make_node("Add", ["boxes_c", "z"], ["boxes"]),
        helper.make_node("Add", ["scores_c", "z"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes, "boxes", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, h, w])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [n, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n, classes])],
        [conv, numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(boxes, "boxes_c"),
         numpy_helper.from_array(scores, "scores_c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return boxes[:4]


def test_run_writes_generic_detections(tmp_path):
    model = tmp_path / "det.onnx"
    known = _box_detector(model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=192, height=128, frames=4, seed=1)
    out = tmp_path / "d.jsonl"
    code = main(["run", str(model), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--metric", "det", "--boxes", "boxes", "--scores", "scores", "--detections", str(out)])
    assert code == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:  # frames are 2x the 96x64 input: boxes come back in the frame's pixels
        assert sorted(map(tuple, line["boxes"])) == sorted(map(tuple, (known * 2).tolist()))
        assert sorted(line["classes"]) == [0, 0, 1, 2]


def test_model_not_fitting_the_options_is_refused(tmp_path, capsys):
    model = tmp_path / "det.onnx"
    _box_detector(model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=96, height=64, frames=3, seed=1)
    common = ["run", str(model), str(clip), "--plan", "dense", "--metric", "det"]
    assert main(common + ["--boxes", "scores", "--scores", "boxes"]) == 2
    assert "--boxes: output scores has shape (6, 3), not N x 4" in capsys.readouterr().err
    assert main(common + ["--boxes", "boxes", "--scores", "logits"]) == 2
    assert "--scores logits: no such output; the model's outputs are boxes, scores" in capsys.readouterr().err
    assert main(common + ["--head", "yolov8"]) == 2
    assert "--head yolov8: output boxes has shape (6, 4), not 1 x (4 + classes) x N" in capsys.readouterr().err
    assert main(common + ["--box-format", "xywh"]) == 2
    assert "give --boxes OUTPUT --scores OUTPUT" in capsys.readouterr().err
    assert main(common) == 2  # det without a preset or the generic options
    assert "--boxes B --scores S" in capsys.readouterr().err


# -- YOLOX-nano with its decoding as ONNX nodes ---------------------------------------------------


def yolox_with_decoding(source, target) -> None:
    """YOLOX-nano's raw head [1, 3549, 85] decoded inside the graph, as YOLOX's demo decodes it
    (`YoloxDecoder`): boxes (3549, 4) x1 y1 x2 y2 in input pixels, scores (3549, 80) =
    objectness x class score."""
    proto = onnx.load(str(source))
    raw = proto.graph.output[0].name
    cells, strides = YoloxDecoder().grids(3549)
    c = {"cells": cells, "strides": strides[:, None], "lim": np.float32(20), "two": np.float32(2),
         "s0": np.array([0], np.int64), "s2": np.array([2], np.int64), "s4": np.array([4], np.int64),
         "s5": np.array([5], np.int64), "s85": np.array([85], np.int64), "ax1": np.array([1], np.int64),
         "ax0": np.array([0], np.int64)}
    proto.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in c.items())
    n = helper.make_node
    proto.graph.node.extend([
        n("Squeeze", [raw], ["d_raw"], axes=[0]),  # opset 11: axes as an attribute
        n("Slice", ["d_raw", "s0", "s2", "ax1"], ["d_xy"]),
        n("Slice", ["d_raw", "s2", "s4", "ax1"], ["d_wh"]),
        n("Slice", ["d_raw", "s4", "s5", "ax1"], ["d_obj"]),
        n("Slice", ["d_raw", "s5", "s85", "ax1"], ["d_cls"]),
        n("Add", ["d_xy", "cells"], ["d_xy_cell"]),
        n("Mul", ["d_xy_cell", "strides"], ["d_centre"]),
        n("Min", ["d_wh", "lim"], ["d_wh_lim"]),
        n("Exp", ["d_wh_lim"], ["d_wh_exp"]),
        n("Mul", ["d_wh_exp", "strides"], ["d_size"]),
        n("Div", ["d_size", "two"], ["d_half"]),
        n("Sub", ["d_centre", "d_half"], ["d_tl"]),
        n("Add", ["d_centre", "d_half"], ["d_br"]),
        n("Concat", ["d_tl", "d_br"], ["boxes"], axis=1),
        n("Mul", ["d_obj", "d_cls"], ["scores"]),
    ])
    del proto.graph.output[:]
    proto.graph.output.extend([helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [3549, 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3549, 80])])
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


@pytest.fixture(scope="module")
def yolox_decoded(shared_data, tmp_path_factory):
    target = tmp_path_factory.mktemp("yolox") / "yolox_decoded.onnx"
    yolox_with_decoding(shared_data / "models" / "yolox_nano_coco_416.onnx", target)
    return target


def test_yolox_decoded_in_the_graph_matches_the_preset_decoder(shared_data, yolox_decoded):
    """Same detections, per frame, from the graph's decoding and from the preset's."""
    import onnxruntime as ort

    from tests.conftest import preprocessor, read_frames

    raw = ort.InferenceSession(str(shared_data / "models" / "yolox_nano_coco_416.onnx"), providers=["CPUExecutionProvider"])
    decoded = ort.InferenceSession(str(yolox_decoded), providers=["CPUExecutionProvider"])
    preset = get_decoder("yolox", (1, 3, 416, 416))
    generic = get_decoder(None, (1, 3, 416, 416), ["boxes", "scores"],
                          DetectorOptions(boxes="boxes", scores="scores", score_threshold=0.3))
    pre = preprocessor("yolox")
    found = 0
    for rgb in read_frames(shared_data / "videos" / "intersection_cctv_640x480_909f.mp4", 3):
        x = pre(rgb)
        a = preset(raw.run(None, {"images": x}))
        b = generic(decoded.run(None, {"images": x}))
        assert a.classes.tolist() == b.classes.tolist()
        assert np.allclose(a.boxes, b.boxes, atol=1e-3) and np.allclose(a.scores, b.scores, atol=1e-6)
        found += len(a)
    assert found > 0
    model = load_model(yolox_decoded)
    check_preset("yolox", model, DetectorOptions(boxes="boxes", scores="scores"))  # generic overrides the preset
    with pytest.raises(DelucevaError, match="preset yolox does not fit"):
        check_preset("yolox", model)
    assert get_metric("det", "yolox", (1, 3, 416, 416), model.output_names,
                      DetectorOptions(boxes="boxes", scores="scores")).decoder.options.boxes == "boxes"


@pytest.mark.slow
def test_yolox_decoded_run_gives_the_preset_detections(shared_data, yolox_decoded, tmp_path):
    """`run --boxes boxes --scores scores` on the decoded export writes, frame for frame, the
    detections `run --preset yolox` writes on the raw one (same preprocessing, same plans)."""
    video = str(shared_data / "videos" / "intersection_cctv_640x480_909f.mp4")
    common = ["--preset", "yolox", "--metric", "det", "--frames", "60", "--reference-every", "10",
              "--plan", "delta", "--controller", "fixed"]
    for p in ("0", "0.5"):
        preset_out, generic_out = tmp_path / f"preset{p}.jsonl", tmp_path / f"generic{p}.jsonl"
        assert main(["run", str(shared_data / "models" / "yolox_nano_coco_416.onnx"), video, *common,
                     "--percentage", p, "--detections", str(preset_out)]) == 0
        assert main(["run", str(yolox_decoded), video, *common, "--percentage", p, "--boxes", "boxes",
                     "--scores", "scores", "--score-threshold", "0.3", "--detections", str(generic_out)]) == 0
        a = [json.loads(line) for line in preset_out.read_text().splitlines()]
        b = [json.loads(line) for line in generic_out.read_text().splitlines()]
        assert len(a) == len(b) == 60
        for x, y in zip(a, b):
            assert x["classes"] == y["classes"], x["frame"]
            assert np.allclose(x["boxes"], y["boxes"], atol=0.02), x["frame"]
            assert np.allclose(x["scores"], y["scores"], atol=2e-4), x["frame"]


def test_profile_trains_a_det_controller_with_the_generic_options(tmp_path, capsys):
    from deluceva.controller import LearnedController

    model = tmp_path / "det.onnx"
    _box_detector(model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=96, height=64, frames=12, seed=1)
    controller = tmp_path / "controller.json"
    common = ["profile", str(model), "--video", str(clip), "--frames", "12", "--percentages", "0", "0.8",
              "-o", str(tmp_path / "p.json"), "--controller-out", str(controller), "--metric", "det"]
    assert main(common) == 2  # det without a preset or the generic options
    assert "--boxes B --scores S" in capsys.readouterr().err
    assert main(common + ["--boxes", "boxes", "--scores", "scores"]) == 0
    assert "learned controller:" in capsys.readouterr().out
    assert LearnedController.from_json(controller).budget == 0.02
