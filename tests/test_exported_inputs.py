"""Models as exporters make them: an NHWC image input (1 x H x W x 3, then a Transpose, as tf2onnx
writes) and a uint8 one (the graph casts and normalises the pixels) run, rewritten into a
float32 NCHW input, exactly as onnxruntime runs the file at p = 0 (dense, delta and mixed plans);
and they are refused in one accurate line only where they cannot run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import relative_error
from onnx import TensorProto, helper, numpy_helper

from deluceva.cli import main
from deluceva.errors import DelucevaError
from deluceva.media.video import synthesise_clip
from deluceva.planner import load_model
from deluceva.planner.load_model import adapt_image_input, declared_input_shape, image_input
from deluceva.session import Session

H, W = 24, 32


def exported(layout: str = "NHWC", uint8: bool = False, order: str = "cast-first", dims=None, seed: int = 0):
    """A small CNN behind the input as an exporter writes it: [uint8 ->] Cast -> [Transpose to
    NCHW] -> (x - mean) * scale -> Conv -> Relu -> Conv -> MaxPool -> Conv (order "transpose-first":
    Transpose before the Cast)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)
             for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (8, 8, 3, 3)), ("w3", (4, 8, 1, 1)))]
    inits += [numpy_helper.from_array(np.array([120.0, 110.0, 100.0], np.float32).reshape(1, 3, 1, 1), "mean"),
              numpy_helper.from_array(np.float32(1 / 64), "scale")]
    shape = dims or ([1, H, W, 3] if layout == "NHWC" else [1, 3, H, W])
    nodes, x = [], "pixels"

    def add(op, inputs, **attrs):
        out = f"t{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    if layout == "NHWC" and order == "transpose-first":
        x = add("Transpose", [x], perm=[0, 3, 1, 2])
    if uint8:
        x = add("Cast", [x], to=TensorProto.FLOAT)
    if layout == "NHWC" and order != "transpose-first":
        x = add("Transpose", [x], perm=[0, 3, 1, 2])
    x = add("Mul", [add("Sub", [x, "mean"]), "scale"])
    x = add("Relu", [add("Conv", [x, "w1"], pads=[1, 1, 1, 1])])
    x = add("Conv", [x, "w2"], pads=[1, 1, 1, 1])
    x = add("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    nodes.append(helper.make_node("Conv", [x, "w3"], ["out"]))
    graph = helper.make_graph(
        nodes, "exported",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8 if uint8 else TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def frames(count: int = 5, seed: int = 1) -> list[np.ndarray]:
    """Consecutive RGB frames (H, W, 3) uint8 where a block moves: something to filter."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = []
    for i in range(count):
        f = base.copy()
        f[4:12, 2 + 3 * i: 10 + 3 * i] = 250
        out.append(f)
    return out


def as_file_input(rgb: np.ndarray, layout: str, uint8: bool) -> np.ndarray:
    x = rgb[None] if layout == "NHWC" else np.moveaxis(rgb, 2, 0)[None]
    return np.ascontiguousarray(x if uint8 else x.astype(np.float32))


CASES = [("NHWC", False, "cast-first"), ("NCHW", True, "cast-first"), ("NHWC", True, "cast-first"),
         ("NHWC", True, "transpose-first")]


@pytest.mark.parametrize("layout, uint8, order", CASES)
def test_read_and_rewritten_to_float_nchw(layout, uint8, order):
    proto = exported(layout, uint8, order)
    image = image_input(proto)
    assert (image.layout, image.uint8, image.dims) == (layout, uint8, (1, 3, H, W))
    assert image.told_by == ("graph" if layout == "NHWC" else "default")
    model = load_model(proto)
    assert model.input_shape == (1, 3, H, W) and model.exported_input == image
    ops = [n.op_type for n in model.onnx.graph.node]
    assert "Transpose" not in ops and "Cast" not in ops  # the rewrite left nothing of the exporter's input
    adapted = onnx.ModelProto()
    adapted.CopyFrom(proto)
    adapt_image_input(adapted, image)  # the rewrite itself (onnxruntime's optimiser may cancel transposes too)
    assert [n.op_type for n in adapted.graph.node][:3] == ["Sub", "Mul", "Conv"]
    assert adapted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_value for d in adapted.graph.input[0].type.tensor_type.shape.dim] == [1, 3, H, W]
    assert load_model(exported()).exported_input.layout == "NHWC"
    assert load_model(exported("NCHW")).exported_input is None  # a plain model stays as it was


@pytest.mark.parametrize("layout, uint8, order", CASES)
@pytest.mark.parametrize("plan", ["dense", "delta", "mixed"])
def test_exact_at_p0_against_onnxruntime_on_the_file(layout, uint8, order, plan):
    proto = exported(layout, uint8, order)
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    model = load_model(proto)
    if plan == "mixed":  # every other node delta
        plan = {n.name: ("delta" if i % 2 else "dense") for i, n in enumerate(model.onnx.graph.node)}
    session = Session(model, plan=plan)
    for rgb in frames():
        want = reference.run(None, {"pixels": as_file_input(rgb, layout, uint8)})[0]
        got = session.run(np.moveaxis(rgb, 2, 0)[None].astype(np.float32), 0.0)[0]
        assert relative_error(got, want) < 1e-4


def test_layout_option_where_the_graph_cannot_tell():
    """Dims all dynamic and the Transpose not right after the input (a Sub in NHWC first): NCHW
    unless told NHWC; told, the rewrite keeps a Transpose inside the graph and stays exact."""
    w = numpy_helper.from_array(np.random.default_rng(2).standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    mean = numpy_helper.from_array(np.array([120.0, 110.0, 100.0], np.float32).reshape(1, 1, 1, 3), "mean")
    nodes = [helper.make_node("Sub", ["pixels", "mean"], ["centred"]),
             helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["out"])]
    proto = helper.make_model(helper.make_graph(
        nodes, "late", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, "h", "w", "c"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [w, mean]),
        opset_imports=[helper.make_opsetid("", 13)])
    assert image_input(proto).layout == "NCHW"
    assert image_input(proto, "NHWC").told_by == "option"
    model = load_model(proto, (1, 3, H, W), layout="NHWC")
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for plan in ("dense", "delta"):
        session = Session(model, plan=plan)
        for rgb in frames(3):
            want = reference.run(None, {"pixels": rgb[None].astype(np.float32)})[0]
            got = session.run(np.moveaxis(rgb, 2, 0)[None].astype(np.float32), 0.0)[0]
            assert relative_error(got, want) < 1e-4


def test_nhwc_read_from_its_shape_without_a_transpose_at_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    proto = exported("NHWC")
    onnx.save(proto, path)
    assert declared_input_shape(path) == [1, 3, H, W]  # not 1 x 24 x 32 x 3: "24 channels"
    no_transpose = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, H, W, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 13)])
    image = image_input(no_transpose)
    assert (image.layout, image.told_by) == ("NHWC", "shape")


def test_cli_runs_a_uint8_nhwc_export_exactly(tmp_path):
    path, out = tmp_path / "tf.onnx", tmp_path / "out.npz"
    proto = exported("NHWC", uint8=True)
    onnx.save(proto, path)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=W * 2, height=H * 2, frames=4, seed=5)
    assert main(["run", str(path), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--outputs", str(out), "--save-inputs"]) == 0
    saved = np.load(out)
    reference = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = saved["input:pixels"]
    assert inputs.shape == (4, 1, 3, H, W) and np.array_equal(inputs, np.round(inputs))
    for x, got in zip(inputs, saved["out"]):
        pixels = np.moveaxis(x, 1, 3).astype(np.uint8)  # what the file takes: 1 x H x W x 3 uint8
        assert relative_error(got, reference.run(None, {"pixels": pixels})[0]) < 1e-4


def test_summary_says_how_the_input_was_exported_and_layout_option_is_checked(tmp_path, capsys):
    path, summary = tmp_path / "tf.onnx", tmp_path / "s.json"
    onnx.save(exported("NHWC", uint8=True), path)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=W, height=H, frames=2, seed=5)
    assert main(["run", str(path), str(clip), "--plan", "dense", "--summary", str(summary)]) == 0
    assert json.loads(summary.read_text())["input_as_exported"] == "uint8 NHWC (layout from the graph's Transpose)"
    nchw = tmp_path / "nchw.onnx"
    onnx.save(exported("NCHW"), nchw)  # 1 x 3 x 24 x 32, told it is NHWC: 32 channels, refused as such
    assert main(["run", str(nchw), str(clip), "--plan", "dense", "--layout", "NHWC"]) == 2
    assert "model input has 32 channels, preset gives 3" in capsys.readouterr().err


def test_bench_baseline_takes_the_rewritten_input(tmp_path):
    path = tmp_path / "tf.onnx"
    onnx.save(exported("NHWC", uint8=True), path)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=W, height=H, frames=12, seed=5)
    figures = tmp_path / "bench.json"
    assert main(["bench", str(path), str(clip), "--plan", "delta", "--controller", "fixed", "--percentage", "0",
                 "--json", str(figures)]) == 0
    assert json.loads(figures.read_text())["error_mean"] < 1e-4


@pytest.mark.parametrize("extra, message", [
    (["--preset", "mtcnn"], "takes uint8 pixels 0..255 (the graph converts them itself), but preset mtcnn scales them"),
    (["--scale", "0.0039"], "but the preprocessing scales them (scale 0.0039"),
])
def test_uint8_input_refuses_preprocessing_that_changes_the_pixels(tmp_path, capsys, extra, message):
    path = tmp_path / "u8.onnx"
    onnx.save(exported("NCHW", uint8=True), path)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=W, height=H, frames=2, seed=5)
    assert main(["run", str(path), str(clip), "--plan", "dense", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and "\n" not in err


def test_uint8_grey_levels_refused():
    from deluceva.media.preprocess import Preprocessor
    from deluceva.playback.setup import check_uint8_pixels

    check_uint8_pixels(Preprocessor(), "m.onnx", "pixels")  # raw pixels: fine
    with pytest.raises(DelucevaError, match="makes fractional grey levels"):
        check_uint8_pixels(Preprocessor(channels="GRAY"), "m.onnx", "pixels")


def test_other_element_types_refused_naming_the_type():
    proto = exported("NCHW")
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    with pytest.raises(DelucevaError, match=r"input 'pixels' is float16 1x3x24x32, not an image tensor"):
        image_input(proto)


def test_unnamed_nodes_never_take_another_nodes_name():
    """Unnamed nodes (a decoding tail appended to an export) got "{op}_{index}", which one of the
    exporter's own nodes could already have: onnxruntime then refused the model."""
    proto = exported("NCHW")  # Sub, Mul, Conv, Relu, Conv, MaxPool, Conv: all unnamed
    proto.graph.node[2].name = "Conv_6"  # the exporter's name for the first Conv: the last one's default
    model = load_model(proto)
    names = [n.name for n in model.onnx.graph.node]
    assert len(set(names)) == len(names)
    Session(model, plan="delta").run(np.zeros((1, 3, H, W), np.float32))
