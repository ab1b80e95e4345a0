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
    from deluceva.media.video import synthesise_clip

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


@pytest.mark.parametrize("option, value, says", [("--threads", "0", "must be at least 1"),
                                                  ("--every", "0", "must be at least 1"),
                                                  ("--frames", "-3", "must be at least 1"),
                                                  ("--reference-every", "0", "must be at least 1"),
                                                  ("--error-budget", "-1", "must be a positive number"),
                                                  ("--error-budget", "nan", "must be a positive number"),
                                                  ("--drop-late", "-1", "at least 0"),
                                                  ("--drop-late", "soon", "not a number of seconds")])
def test_cli_invalid_numeric_options(files, clip, option, value, says, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["run", str(files["good"]), str(clip), option, value])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"argument {option}" in err and says in err, err


# -- issue 10: what a new user tried ---------------------------------------------------------


def test_fixed_batch_other_than_one_is_refused(tmp_path, clip, capsys):
    path = tmp_path / "batch2.onnx"
    onnx.save(conv_model(dims=(2, 3, 16, 16)), path)
    refused(path, "fixed batch of 2; deluceva runs one frame at a time")
    for command in (["run", path, clip, "--plan", "dense"], ["profile", path, "--video", clip, "-o", tmp_path / "p.json"],
                    ["bench", path, clip, "--plan", "dense"]):
        assert "fixed batch of 2" in cli_refuses(command, capsys)


def _named_outputs_model(names, dims=(1, 3, "h", "w")) -> onnx.ModelProto:
    """x -> one Relu per output name: a model whose outputs a preset's decoder can check."""
    nodes = [helper.make_node("Relu", ["x"], [name], name=f"relu_{name}") for name in names]
    graph = helper.make_graph(nodes, "named", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("preset, needs", [("yunet", "yunet decoder needs outputs cls_8"),
                                           ("yolox", "yolox decoder expects a [1, anchors, 5 + classes] output"),
                                           ("mtcnn", "mtcnn decoder expects a 2-channel probability map")])
def test_a_preset_whose_decoder_does_not_fit_the_model_is_refused(tmp_path, clip, preset, needs, capsys):
    path = tmp_path / "plain.onnx"
    onnx.save(_named_outputs_model(["out"]), path)
    line = cli_refuses(["run", path, clip, "--plan", "dense", "--preset", preset], capsys)
    assert f"preset {preset} does not fit this model" in line and needs in line


def test_a_model_with_dynamic_size_gets_frames_padded_to_32(tmp_path, capsys):
    """A stride-32 pyramid on a 720-row video: at the frame's own size its Add fails; padded by
    default (as the README says) it runs; told not to pad, the error says what fixes it."""
    from deluceva.media.video import synthesise_clip

    weight = numpy_helper.from_array(np.full((3, 3, 1, 1), 0.1, np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "s")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[32, 32]),
             helper.make_node("Resize", ["c", "", "s"], ["r"], mode="nearest"),
             helper.make_node("Add", ["x", "r"], ["y"])]
    graph = helper.make_graph(nodes, "pyramid", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "pyramid.onnx"
    onnx.save(model, path)
    clip = synthesise_clip(tmp_path / "wide.mp4", width=320, height=208, frames=2)  # 208 = 6.5 x 32
    assert main(["run", str(path), str(clip), "--plan", "dense", "--controller", "fixed"]) == 0
    capsys.readouterr()
    line = cli_refuses(["run", path, clip, "--plan", "dense", "--resize", "none"], capsys)
    assert "cannot run the model on a (1, 3, 208, 320) input" in line and "--resize pad" in line


def test_a_plan_that_does_not_describe_the_model_is_refused(tmp_path):
    from deluceva.planner.plan_file import PlanFile

    model = load_model(conv_model())
    nodes = [{"name": n.name, "op_type": n.op_type} for n in model.onnx.graph.node]
    data = {"model": {"sha256": model.sha256, "input_shape": list(model.input_shape)}, "nodes": nodes[:1]}
    with pytest.raises(DelucevaError, match="does not describe the model's 2 nodes: 1 of its nodes missing"):
        PlanFile(data, "cut.json").check_model(model)
    data["nodes"] = [*nodes, {"name": "extra", "op_type": "Relu"}]
    with pytest.raises(DelucevaError, match="1 nodes it does not have \\(e.g. extra\\)"):
        PlanFile(data, "more.json").check_model(model)
    data["nodes"] = [{**nodes[0], "op_type": "Gemm"}, nodes[1]]
    with pytest.raises(DelucevaError, match="1 with another op type"):
        PlanFile(data, "retyped.json").check_model(model)


def test_a_tampered_hash_is_printed_far_enough_to_differ():
    from deluceva.planner.plan_file import PlanFile

    model = load_model(conv_model())
    forged = model.sha256[:20] + ("0" if model.sha256[20] != "0" else "1") + model.sha256[21:]
    data = {"model": {"sha256": forged, "input_shape": list(model.input_shape), "path": "m.onnx"}, "nodes": []}
    with pytest.raises(DelucevaError) as caught:
        PlanFile(data, "forged.json").check_model(model)
    shown = [part.split("…")[0] for part in str(caught.value).split("sha256 ")[1:]]
    assert shown[0] != shown[1] and len(shown[0]) >= 21


def test_a_profile_for_another_input_size_says_so(tmp_path, capsys):
    import json

    path = tmp_path / "fixed.onnx"
    onnx.save(conv_model(), path)
    profile = tmp_path / "other.profile.json"
    model = load_model(conv_model())
    profile.write_text(json.dumps({
        "format": "deluceva-profile", "schema_version": 2, "model": {"sha256": model.sha256, "input_shape": [1, 3, 32, 32]},
        "machine": {}, "settings": {}, "percentages": [0.0], "dense_model_ms": 1.0, "segment_overhead_ms": 0.0,
        "nodes": {}, "tensors": {}}))
    line = cli_refuses(["compile", path, "--profile", profile, "-o", tmp_path / "plan.json"], capsys)
    assert "profile was measured for input shape (1, 3, 32, 32)" in line and "takes (1, 3, 16, 16)" in line


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_session_threads_must_be_a_positive_whole_number(threads):
    refused(conv_model(), "threads must be a positive whole number", threads=threads)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("plan", ["delta", "dense"])
def test_a_frame_that_is_not_finite_gives_what_onnxruntime_gives(bad, plan):
    """Never the previous frame's outputs: the frame runs as a keyframe, so the outputs hold the
    NaN or infinity where onnxruntime's do; the next finite frame is exact again."""
    import onnxruntime as ort

    session = Session(conv_model(), plan=plan)
    reference = ort.InferenceSession(conv_model().SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    frames = [rng.standard_normal((1, 3, 16, 16)).astype(np.float32) for _ in range(4)]
    frames[2][0, 1, 5, 6] = bad
    for frame in frames:
        got = session.run(frame)[0]
        want = reference.run(None, {"x": frame})[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NaN where onnxruntime has NaN
    assert not np.isfinite(session.run(frames[2])[0]).all()


def test_unreachable_and_silent_streams_say_so():
    import socket
    import threading
    import time

    from deluceva.media.video import open_video

    with pytest.raises(DelucevaError, match="unreachable: 127.0.0.1:9"):
        list(open_video("rtsp://127.0.0.1:9/x", timeout=2))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    accepted = []
    threading.Thread(target=lambda: [accepted.append(listener.accept()) for _ in range(3)], daemon=True).start()
    port = listener.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(DelucevaError, match="timed out"):
        list(open_video(f"rtsp://127.0.0.1:{port}/x", timeout=1.5))
    assert time.monotonic() - start < 10
    listener.close()


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path):
    """The outputs so far and the summary are written, the summary says interrupted."""
    import json
    import signal
    import time

    from deluceva.media.video import synthesise_clip

    path = tmp_path / "m.onnx"
    onnx.save(conv_model(dims=(1, 3, "h", "w")), path)
    clip = synthesise_clip(tmp_path / "long.mp4", width=64, height=48, frames=3000)
    out, summary = tmp_path / "o.npz", tmp_path / "s.json"
    process = subprocess.Popen([sys.executable, "-m", "deluceva.cli", "run", str(path), str(clip), "--plan", "dense",
                                "--controller", "fixed", "--outputs", str(out), "--summary", str(summary)],
                               stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "o.npz.parts"
    deadline = time.monotonic() + 60
    while not (parts.is_dir() and any(parts.glob("*.npy"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert json.loads(summary.read_text())["interrupted"] is True
    with np.load(out) as data:
        assert 0 < data["y"].shape[0] < 3000
