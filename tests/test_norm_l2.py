"""norm-l2 (error relative to each output's typical norm on the calibration frames) and the
warning when rel-l2 is held on softmax or sigmoid scores."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.cli import main
from deluceva.errors import DelucevaError
from deluceva.media.video import synthesise_clip
from deluceva.metrics import DEFAULT_BUDGETS, get_metric, norm_l2, rel_l2, score_outputs, typical_norms
from deluceva.planner import load_model


def test_norm_l2_does_not_explode_on_a_near_empty_map():
    rng = np.random.default_rng(0)
    calibration = []
    for _ in range(5):  # maps with some text: a few bright cells each
        m = np.zeros((32, 32), np.float32)
        m[rng.integers(0, 32, 20), rng.integers(0, 32, 20)] = 0.9
        calibration.append([m])
    empty = np.zeros((32, 32), np.float32)
    empty[3, 3] = 0.01  # the frame to measure: nearly no text
    noisy = empty + 0.002 * rng.standard_normal(empty.shape).astype(np.float32)
    metric = get_metric("norm-l2")
    metric.calibrate(calibration)
    assert rel_l2([noisy], [empty]) > 3  # relative to the near-empty frame itself: huge
    assert metric([noisy], [empty]) < 0.02  # relative to what the map usually holds: small
    assert metric([noisy], [empty]) == pytest.approx(
        float(np.linalg.norm(noisy - empty)) / float(np.sqrt(np.mean([np.sum(c[0] ** 2) for c in calibration]))))


def test_norm_l2_is_the_worst_output_and_needs_calibration():
    assert norm_l2([np.array([1.0, 0.0]), np.array([2.0])], [np.array([1.0, 0.5]), np.array([1.0])], [1.0, 4.0]) == 0.5
    assert typical_norms([[np.zeros(4)]]) == [pytest.approx(2e-6)]  # all empty: the rel-l2 floor
    metric = get_metric("norm-l2")
    assert metric.budget == DEFAULT_BUDGETS["norm-l2"] and DEFAULT_BUDGETS["rel-l2"] == 0.05
    with pytest.raises(DelucevaError, match="calibrate it first"):
        metric([np.ones(2)], [np.ones(2)])
    rel = get_metric("rel-l2")
    rel.calibrate([[np.ones(2) * 100]])  # rel-l2 keeps its meaning: nothing to calibrate
    assert rel([np.ones(2)], [np.ones(2) * 2]) == pytest.approx(0.5)


def _scored_model(path, last: str):
    """Conv, then a score head: softmax over 2 classes (reshaped) or a sigmoid map, or raw."""
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32) * 0.2, "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["logits"], pads=[1, 1, 1, 1])]
    if last == "softmax":
        nodes += [helper.make_node("Softmax", ["logits"], ["p"], axis=1),
                  helper.make_node("Flatten", ["p"], ["scores"])]
        shape = None
    elif last == "sigmoid":
        nodes += [helper.make_node("Sigmoid", ["logits"], ["scores"])]
        shape = None
    else:
        nodes += [helper.make_node("Relu", ["logits"], ["scores"])]
        shape = None
    graph = helper.make_graph(nodes, "scored", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 24])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, shape)], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


@pytest.mark.parametrize("last, scores", [("softmax", ["scores"]), ("sigmoid", ["scores"]), ("relu", [])])
def test_score_outputs_found_through_reshapes(tmp_path, last, scores):
    assert score_outputs(load_model(_scored_model(tmp_path / "m.onnx", last))) == scores


def test_rel_l2_on_scores_warns_and_names_det(tmp_path, capsys):
    clip = synthesise_clip(tmp_path / "clip.mp4", width=48, height=32, frames=4, seed=2)
    common = ["--plan", "delta", "--controller", "fixed", "--percentage", "0.5", "--reference-every", "2"]
    sigmoid = str(_scored_model(tmp_path / "sigmoid.onnx", "sigmoid"))
    assert main(["run", sigmoid, str(clip), *common]) == 0
    err = capsys.readouterr().err
    assert "warning: scores is softmax or sigmoid scores" in err and "--metric det" in err
    summary = tmp_path / "s.json"
    assert main(["run", sigmoid, str(clip), *common, "--metric", "norm-l2", "--summary", str(summary)]) == 0
    assert "warning" not in capsys.readouterr().err
    written = json.loads(summary.read_text())
    assert written["metric"] == "norm-l2" and written["budget"] == 0.05 and written["error_mean"] is not None
    relu = str(_scored_model(tmp_path / "relu.onnx", "relu"))
    assert main(["run", relu, str(clip), *common]) == 0
    assert "warning" not in capsys.readouterr().err
