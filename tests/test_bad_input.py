"""Bad input is refused with a clear one-line message: never a traceback, never a wrong answer.

Through the Python API (`load_model`, `Session`) every case raises `DelucevaError` naming the
file and the problem; through the CLI (`deluceva run`, `profile`, `compile`) it ends with exit
status 2 and a single stderr line.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.cli import main
from deluceva.errors import DelucevaError
from deluceva.planner import load_model
from deluceva.session import Session


def conv_model(dims=(1, 3, 16, 16), elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Relu: a valid little image model (with `dims` as its declared input)."""
    weight = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "small", [helper.make_tensor_value_info("x", elem_type, list(dims))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def one_node_model(inputs, node) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def not_images() -> dict[str, onnx.ModelProto]:
    info = helper.make_tensor_value_info
    return {
        "2-D input": one_node_model([info("x", TensorProto.FLOAT, [4, 5])], helper.make_node("Relu", ["x"], ["y"])),
        "int64 input": one_node_model([info("x", TensorProto.INT64, [1, 3, 8, 8])],
                                      helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)),
        "two inputs": one_node_model([info("x", TensorProto.FLOAT, [1, 3, 8, 8]), info("z", TensorProto.FLOAT, [1, 3, 8, 8])],
                                     helper.make_node("Add", ["x", "z"], ["y"])),
        "no input": one_node_model([], helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(
            np.ones((1, 3, 4, 4), np.float32)))),
        "5-D input": one_node_model([info("x", TensorProto.FLOAT, [1, 3, 2, 8, 8])], helper.make_node("Relu", ["x"], ["y"])),
    }


EXPECTED_NOT_IMAGE = {
    "2-D input": "not an image tensor",
    "int64 input": "not an image tensor",
    "two inputs": "expected one image input, found 2",
    "no input": "expected one image input, found 0",
    "5-D input": "not an image tensor",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Bad model files, plus a good one, in a temporary folder."""
    folder = tmp_path_factory.mktemp("bad")
    made = {}

    def write(name: str, content: bytes) -> None:
        made[name] = folder / f"{name.replace(' ', '_')}.onnx"
        made[name].write_bytes(content)

    good = conv_model().SerializeToString()
    write("good", good)
    write("text", b"name,value\nthis is a CSV file, not a model\n")
    write("random bytes", np.random.default_rng(0).bytes(3000))
    write("empty", b"")
    write("truncated half", good[: len(good) // 2])
    write("truncated end", good[:-5])
    for name, model in not_images().items():
        write(name, model.SerializeToString())
    made["missing"] = folder / "no_such_model.onnx"
    made["directory"] = folder
    return made


def refused(source, match: str, **kwargs) -> str:
    with pytest.raises(DelucevaError) as caught:
        Session(source, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and match in message, message
    return message


# -- the Python API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, match",
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("text", "not an ONNX model"),
        ("random bytes", "not an ONNX model"),
        ("empty", "not an ONNX model"),
        ("truncated half", "not an ONNX model"),
        ("truncated end", "not an ONNX model"),
    ],
)
def test_unreadable_file(files, name, match):
    message = refused(files[name], match)
    assert str(files[name]) in message  # the message names the file


def test_every_truncation_of_a_model_is_refused(tmp_path):
    """Cut a real model at many points: each prefix is refused, none loads as something else."""
    raw = conv_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for cut in range(0, len(raw), 7):
        path.write_bytes(raw[:cut])
        with pytest.raises(DelucevaError) as caught:
            load_model(path)
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(EXPECTED_NOT_IMAGE))
def test_input_is_not_an_image(files, name):
    refused(files[name], EXPECTED_NOT_IMAGE[name])
    refused(not_images()[name], EXPECTED_NOT_IMAGE[name])  # in memory as well


def test_invalid_graph_is_refused_in_one_line():
    model = conv_model()
    model.graph.node[0].input[1] = "nowhere"  # reads a tensor nothing produces
    refused(model, "invalid ONNX model")


def test_old_opset_is_refused():
    model = conv_model()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 7))
    model.ir_version = 3  # IR 3 lists every initializer as a graph input too
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    refused(model, "opset 7 is not supported")


def test_dynamic_dims_need_an_input_shape():
    model = conv_model(dims=(1, 3, "height", "width"))
    refused(model, "dynamic dimensions; give an input shape")
    session = Session(model, input_shape=(1, 3, 12, 20))  # with one it loads
    assert session.model.input_shape == (1, 3, 12, 20)


@pytest.mark.parametrize(
    "shape, match",
    [((1, 3, 8, 8), "fixed shape"), ((1, 4, 16, 16), "fixed shape"), ((3, 16, 16), "is not 1xCxHxW"),
     ((1, 3, 16, 16, 1), "is not 1xCxHxW"), ((2, 3, 16, 16), "is not 1xCxHxW"), ((1, 3, 0, 16), "is not 1xCxHxW")],
)
def test_input_shape_that_does_not_fit(shape, match):
    refused(conv_model(), match, input_shape=shape)


def test_shapeless_graph_output_is_accepted():
    """onnx.helper leaves an output's shape out for 'unknown'; onnxruntime runs such models."""
    model = conv_model()
    assert not model.graph.output[0].type.tensor_type.HasField("shape")
    frame = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert Session(model).run(frame)[0].shape == (1, 4, 16, 16)


@pytest.mark.parametrize(
    "frame",
    [np.zeros((1, 3, 8, 8), np.float32), np.zeros((3, 16, 16), np.float32), np.zeros((1, 16, 16, 3), np.float32),
     np.zeros((1, 3, 16, 16, 1), np.float32), None],
    ids=["smaller", "no batch", "NHWC", "5-D", "None"],
)
def test_frame_of_the_wrong_shape(frame):
    session = Session(conv_model())
    good = np.ones((1, 3, 16, 16), np.float32)
    session.run(good)
    with pytest.raises(DelucevaError, match="frame has shape .* the model takes \\(1, 3, 16, 16\\)"):
        session.run(frame)
    session.run(good + 1)  # a refused frame leaves the session usable


@pytest.mark.parametrize("percentage", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_percentage_outside_zero_one(percentage):
    session = Session(conv_model())
    frame = np.ones((1, 3, 16, 16), np.float32)
    session.run(frame)
    with pytest.raises(DelucevaError, match="outside \\[0, 1\\)"):
        session.run(frame, percentage=percentage)


def test_unknown_plan():
    with pytest.raises(DelucevaError, match="unknown plan"):
        Session(conv_model(), plan="fast")
    with pytest.raises(DelucevaError, match="does not have"):
        Session(conv_model(), plan={"nonexistent": "delta"})
    with pytest.raises(DelucevaError, match="must be 'dense' or 'delta'"):
        Session(conv_model(), plan={"conv": "sparse"})


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    from deluceva.runtime.video import synthesise_clip

    return synthesise_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", width=64, height=48, frames=4)


CLI_CASES = ["missing", "directory", "text", "random bytes", "empty", "truncated half", "truncated end",
             "2-D input", "two inputs", "int64 input"]


def cli_refuses(argv, capsys) -> str:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert status == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("deluceva: error: ")
    return lines[0]


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_run_refuses_bad_model(files, clip, name, capsys, tmp_path):
    line = cli_refuses(["run", files[name], clip, "--plan", "dense", "--frames", "2",
                        "--outputs", tmp_path / "out.npz"], capsys)
    assert str(files[name]) in line
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("name", ["missing", "text", "truncated half", "two inputs"])
def test_cli_profile_refuses_bad_model(files, clip, name, capsys, tmp_path):
    cli_refuses(["profile", files[name], "--video", clip, "--frames", "4", "-o", tmp_path / "p.json"], capsys)


def test_cli_compile_refuses_missing_profile(files, capsys, tmp_path):
    cli_refuses(["compile", files["good"], "--profile", tmp_path / "none.json", "-o", tmp_path / "plan.json"], capsys)


def test_console_script_exit_status_and_one_line(files, clip):
    """The installed entry point, in its own process: status 2, one stderr line."""
    result = subprocess.run(
        [sys.executable, "-m", "deluceva.cli", "run", str(files["truncated half"]), str(clip), "--plan", "dense"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr and "not an ONNX model" in lines[0], result.stderr


def test_ir3_model_with_an_unused_initializer_loads():
    """IR 3 lists initializers as graph inputs; one that no node reads must not break loading
    (onnxruntime refuses an IR 3 graph whose initializer is not an input)."""
    model = conv_model()
    model.ir_version = 3
    unused = numpy_helper.from_array(np.ones((1, 1), np.float32), "unused")
    model.graph.initializer.append(unused)
    model.graph.input.extend([helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)
                              for name, dims in (("w", [4, 3, 3, 3]), ("unused", [1, 1]))])
    session = Session(model)
    assert session.model.input_name == "x" and "unused" not in session.model.constants
    frame = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert session.run(frame)[0].shape == (1, 4, 16, 16)


def test_cli_run_refuses_a_preset_that_does_not_fit(files, clip, capsys, tmp_path):
    """Frames the model cannot take (YOLOX's 416x416 letterbox for a 16x16 model) are refused."""
    line = cli_refuses(["run", files["good"], clip, "--plan", "dense", "--preset", "yolox", "--frames", "2",
                        "--outputs", tmp_path / "out.npz"], capsys)
    assert "yolox" in line


@pytest.mark.parametrize("percentage", ["1.5", "-0.2", "1", "half"])
def test_cli_percentage_outside_zero_one(files, clip, percentage, capsys):
    with pytest.raises(SystemExit) as caught:  # an argparse refusal: one line, status 2
        main(["run", str(files["good"]), str(clip), "--controller", "fixed", "--percentage", percentage])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("percentage" in err or "number" in err), err
    assert len(err.strip().splitlines()) == 1 and err.startswith("deluceva run: error:"), err
