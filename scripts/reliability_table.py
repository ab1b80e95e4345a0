"""Regenerate the table in docs/RELIABILITY.md: every bad input we tried, and what deluceva says.

Each case is run for real, in its own process for the CLI (`python -m deluceva.cli ...`), and
its exact stderr line and exit status are recorded with the test that backs it. Nothing here
needs ../shared/data: the models are built with onnx.helper and the clips encoded with PyAV.

    python scripts/reliability_table.py > /tmp/table.md
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def conv_model(dims=(1, 3, 16, 16), elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.full((4, 3, 3, 3), 0.1, np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem_type, list(dims))],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])


def pyramid_model() -> onnx.ModelProto:
    """A stride-32 Conv, upsampled back and added to its input: only sizes divisible by 32 fit."""
    weight = numpy_helper.from_array(np.full((3, 3, 1, 1), 0.1, np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "s")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], strides=[32, 32]),
             helper.make_node("Resize", ["c", "", "s"], ["r"], mode="nearest"),
             helper.make_node("Add", ["x", "r"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight, scales])


def make_files(folder: Path) -> dict[str, Path]:
    from deluceva.planner import load_model
    from deluceva.media.video import synthesise_clip

    info = helper.make_tensor_value_info
    files: dict[str, Path] = {}

    def save(name: str, content) -> None:
        files[name] = folder / name
        files[name].write_bytes(content if isinstance(content, bytes) else content.SerializeToString())

    good = conv_model()
    save("good.onnx", good)
    save("dynamic.onnx", conv_model(dims=(1, 3, "h", "w")))
    save("notes.onnx", b"name,value\nthis is a CSV file, not a model\n")
    save("empty.onnx", b"")
    save("half.onnx", good.SerializeToString()[: len(good.SerializeToString()) // 2])
    save("matrix.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], [info("x", TensorProto.FLOAT, [4, 5])],
                               [info("y", TensorProto.FLOAT, None)]))
    save("two_inputs.onnx", _model([helper.make_node("Add", ["x", "z"], ["y"])],
                                   [info("x", TensorProto.FLOAT, [1, 3, 8, 8]), info("z", TensorProto.FLOAT, [1, 3, 8, 8])],
                                   [info("y", TensorProto.FLOAT, None)]))
    save("int_input.onnx", conv_model(elem_type=TensorProto.INT64))
    old = conv_model()
    old.opset_import[0].version = 6
    save("opset6.onnx", old)
    broken = conv_model()
    broken.graph.node[1].input[0] = "nowhere"
    save("dangling.onnx", broken)
    save("batch2.onnx", conv_model(dims=(2, 3, 16, 16)))
    save("plain_head.onnx", _model([helper.make_node("Relu", ["x"], ["out"])],
                                   [info("x", TensorProto.FLOAT, [1, 3, "h", "w"])], [info("out", TensorProto.FLOAT, None)]))
    save("pyramid.onnx", pyramid_model())
    save("fp16_input.onnx", conv_model(elem_type=TensorProto.FLOAT16))
    uint8 = conv_model()
    uint8.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    uint8.graph.node.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast"))
    uint8.graph.node[1].input[0] = "xf"
    save("uint8_input.onnx", uint8)
    boxes = numpy_helper.from_array(np.array([[1, 1, 8, 8], [4, 4, 12, 12]], np.float32), "boxes_c")
    scores = numpy_helper.from_array(np.array([[0.9, 0.1], [0.2, 0.7]], np.float32), "scores_c")
    save("boxes.onnx", _model([helper.make_node("ReduceMean", ["x"], ["m"], keepdims=0),
                               helper.make_node("Mul", ["m", "zero"], ["z"]),
                               helper.make_node("Add", ["boxes_c", "z"], ["boxes"]),
                               helper.make_node("Add", ["scores_c", "z"], ["scores"])],
                              [info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [info("boxes", TensorProto.FLOAT, [2, 4]), info("scores", TensorProto.FLOAT, [2, 2])],
                              [boxes, scores, numpy_helper.from_array(np.float32(0), "zero")]))
    files["clip.mp4"] = synthesise_clip(folder / "clip.mp4", width=64, height=48, frames=6)
    files["wide.mp4"] = synthesise_clip(folder / "wide.mp4", width=320, height=208, frames=2)
    save("notes.mp4", b"this is text, not a video\n" * 20)
    save("empty.mp4", b"")
    clip = files["clip.mp4"].read_bytes()
    save("cut.mp4", clip[: len(clip) // 3])
    files["missing.onnx"] = folder / "missing.onnx"
    files["missing.mp4"] = folder / "missing.mp4"
    files["folder"] = folder / "a_folder"
    files["folder"].mkdir()
    files["folder.json"] = folder / "a_folder.json"
    files["folder.json"].mkdir()
    files["blocked"] = folder / "blocked"  # a file where the stream clip's folder would go
    files["blocked"].mkdir()
    (files["blocked"] / "clip").write_text("")
    files["earlier"] = folder / "earlier"  # a finished run's --out
    files["earlier"].mkdir()
    (files["earlier"] / "summary.json").write_text("{}")
    save("named.txt", f"summary.json={files['clip.mp4']}\n".encode())
    model = load_model(good)
    save("garbage.json", b"\x00\x01{not json")
    profile = {"format": "deluceva-profile", "schema_version": 2,
               "model": {"sha256": model.sha256, "input_shape": [1, 3, 32, 32]}, "machine": {}, "settings": {},
               "percentages": [0.0], "dense_model_ms": 1.0, "segment_overhead_ms": 0.0, "nodes": {}, "tensors": {}}
    save("other_size.profile.json", json.dumps(profile).encode())
    # A real plan for good.onnx, then one with a node cut out and one with its model hash edited.
    plan_path = folder / "good.plan.json"
    for argv in (["profile", files["good.onnx"], "--video", files["clip.mp4"], "-o", folder / "good.profile.json"],
                 ["compile", files["good.onnx"], "--profile", folder / "good.profile.json", "-o", plan_path]):
        subprocess.run([sys.executable, "-m", "deluceva.cli", *map(str, argv)], check=True, capture_output=True)
    plan = json.loads(plan_path.read_text())
    save("partial.plan.json", json.dumps({**plan, "nodes": plan["nodes"][:1]}).encode())
    sha = plan["model"]["sha256"]
    forged = {**plan, "model": {**plan["model"], "sha256": sha[:20] + ("0" if sha[20] != "0" else "1") + sha[21:]}}
    save("forged.plan.json", json.dumps(forged).encode())
    save("pickle.json", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    return files


# (what was tried, deluceva arguments with {name} for files, the test that backs it)
CLI_CASES = [
    ("model file missing", "run {missing.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model path is a folder", "run {folder} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model is a text file", "run {notes.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model file empty", "run {empty.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model truncated (every length)", "run {half.onnx} {clip.mp4} --plan dense",
     "test_bad_input::test_every_truncation_of_a_model_is_refused"),
    ("model input is 2-D", "run {matrix.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model has two inputs", "run {two_inputs.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("model input is int64", "run {int_input.onnx} {clip.mp4} --plan dense", "test_bad_input::test_cli_run_refuses_bad_model"),
    ("opset 6 model", "run {opset6.onnx} {clip.mp4} --plan dense", "test_bad_input::test_old_opset_is_refused"),
    ("node reads a tensor nobody makes", "run {dangling.onnx} {clip.mp4} --plan dense",
     "test_bad_input::test_invalid_graph_is_refused_in_one_line"),
    ("fixed batch of 2 (run)", "run {batch2.onnx} {clip.mp4} --plan dense", "test_bad_input::test_fixed_batch_other_than_one_is_refused"),
    ("fixed batch of 2 (profile)", "profile {batch2.onnx} --video {clip.mp4} -o {folder}/p.json",
     "test_bad_input::test_fixed_batch_other_than_one_is_refused"),
    ("fixed batch of 2 (bench)", "bench {batch2.onnx} {clip.mp4} --plan dense",
     "test_bad_input::test_fixed_batch_other_than_one_is_refused"),
    ("--preset yunet on a model without YuNet's heads", "run {plain_head.onnx} {clip.mp4} --plan dense --preset yunet",
     "test_bad_input::test_a_preset_whose_decoder_does_not_fit_the_model_is_refused"),
    ("--preset yolox on a model without YOLOX's head", "run {plain_head.onnx} {clip.mp4} --plan dense --preset yolox",
     "test_bad_input::test_a_preset_whose_decoder_does_not_fit_the_model_is_refused"),
    ("--preset mtcnn on a model without P-Net's heads", "run {plain_head.onnx} {clip.mp4} --plan dense --preset mtcnn",
     "test_bad_input::test_a_preset_whose_decoder_does_not_fit_the_model_is_refused"),
    ("--preset yolox's 416x416 letterbox for a 16x16 model", "run {good.onnx} {clip.mp4} --plan dense --preset yolox",
     "test_bad_input::test_cli_run_refuses_a_preset_that_does_not_fit"),
    ("--detections without a detection preset", "run {good.onnx} {clip.mp4} --plan dense --detections {folder}/d.jsonl",
     "test_run_cli::test_detections_need_a_detection_preset"),
    ("--metric det without a preset or the model's boxes and scores", "run {good.onnx} {clip.mp4} --plan dense --metric det",
     "test_generic_det::test_model_not_fitting_the_options_is_refused"),
    ("--boxes naming the scores output (N x 2)", "run {boxes.onnx} {clip.mp4} --plan dense --metric det --boxes scores "
     "--scores boxes", "test_generic_det::test_model_not_fitting_the_options_is_refused"),
    ("--scores naming an output the model lacks", "run {boxes.onnx} {clip.mp4} --plan dense --metric det --boxes boxes "
     "--scores logits", "test_generic_det::test_model_not_fitting_the_options_is_refused"),
    ("--head yolov8 on a model with N x 4 boxes", "run {boxes.onnx} {clip.mp4} --plan dense --metric det --head yolov8",
     "test_generic_det::test_model_not_fitting_the_options_is_refused"),
    ("--background-class past the score columns", "run {boxes.onnx} {clip.mp4} --plan dense --metric det --boxes boxes "
     "--scores scores --background-class 2", "test_generic_det::test_outputs_that_do_not_fit_are_named"),
    ("--box-format without --boxes/--scores", "run {boxes.onnx} {clip.mp4} --plan dense --box-format xywh",
     "test_generic_det::test_model_not_fitting_the_options_is_refused"),
    ("--annotate without detections to draw", "run {good.onnx} {clip.mp4} --plan dense --annotate {folder}/a.mp4",
     "test_annotate::test_annotate_refused_without_detections_or_with_a_bad_suffix"),
    ("--annotate to a .gif", "run {boxes.onnx} {clip.mp4} --plan dense --boxes boxes --scores scores "
     "--annotate {folder}/a.gif", "test_annotate::test_annotate_refused_without_detections_or_with_a_bad_suffix"),
    ("model input is float16", "run {fp16_input.onnx} {clip.mp4} --plan dense",
     "test_exported_inputs::test_other_element_types_refused_naming_the_type"),
    ("uint8 model input (it normalises pixels itself) with preset mtcnn's (x - 127.5) / 128",
     "run {uint8_input.onnx} {clip.mp4} --plan dense --preset mtcnn",
     "test_exported_inputs::test_uint8_input_refuses_preprocessing_that_changes_the_pixels"),
    ("--layout NHWC for a 1x3x16x16 model", "run {good.onnx} {clip.mp4} --plan dense --layout NHWC",
     "test_exported_inputs::test_summary_says_how_the_input_was_exported_and_layout_option_is_checked"),
    ("unknown preset", "run {good.onnx} {clip.mp4} --preset yolo", "test_preprocess::test_for_model_generic_and_unknown_preset"),
    ("a 208-row frame for a stride-32 model, padding turned off", "run {pyramid.onnx} {wide.mp4} --plan dense --resize none",
     "test_bad_input::test_a_model_with_dynamic_size_gets_frames_padded_to_32"),
    ("video missing", "run {good.onnx} {missing.mp4} --plan dense", "test_video::test_missing_file"),
    ("video is a text file", "run {good.onnx} {notes.mp4} --plan dense", "test_video::test_not_a_video"),
    ("video file empty", "run {good.onnx} {empty.mp4} --plan dense", "test_video::test_empty_file_and_directory"),
    ("video truncated before its index", "run {good.onnx} {cut.mp4} --plan dense",
     "test_video::test_truncated_mp4_without_index_is_refused"),
    ("stream nobody listens to", "run {good.onnx} rtsp://127.0.0.1:9/x --plan dense",
     "test_bad_input::test_unreachable_and_silent_streams_say_so"),
    ("--percentage 1.5", "run {good.onnx} {clip.mp4} --controller fixed --percentage 1.5",
     "test_bad_input::test_cli_percentage_outside_zero_one"),
    ("--percentage half", "run {good.onnx} {clip.mp4} --controller fixed --percentage half",
     "test_bad_input::test_cli_percentage_outside_zero_one"),
    ("--threads 0", "run {good.onnx} {clip.mp4} --threads 0", "test_bad_input::test_cli_invalid_numeric_options"),
    ("--every 0", "run {good.onnx} {clip.mp4} --every 0", "test_bad_input::test_cli_invalid_numeric_options"),
    ("--frames -3", "run {good.onnx} {clip.mp4} --frames -3", "test_bad_input::test_cli_invalid_numeric_options"),
    ("--error-budget -1", "run {good.onnx} {clip.mp4} --error-budget -1", "test_bad_input::test_cli_invalid_numeric_options"),
    ("--drop-late -1", "run {good.onnx} {clip.mp4} --drop-late -1", "test_bad_input::test_cli_invalid_numeric_options"),
    ("learned controller file is a pickle", "run {good.onnx} {clip.mp4} --controller learned --learned-model {pickle.json}",
     "test_controllers::test_corrupt_json_refused"),
    ("profile missing", "compile {good.onnx} --profile {missing.onnx}.json -o {folder}/plan.json",
     "test_bad_input::test_cli_compile_refuses_missing_profile"),
    ("profile is not JSON", "compile {good.onnx} --profile {garbage.json} -o {folder}/plan.json",
     "test_cli_planning::test_corrupt_profile_refused"),
    ("profile measured for another input size", "compile {good.onnx} --profile {other_size.profile.json} -o {folder}/plan.json",
     "test_bad_input::test_a_profile_for_another_input_size_says_so"),
    ("plan that covers 1 of the model's 2 nodes", "run {good.onnx} {clip.mp4} --plan {partial.plan.json}",
     "test_bad_input::test_a_plan_that_does_not_describe_the_model_is_refused"),
    ("plan whose model hash was edited", "run {good.onnx} {clip.mp4} --plan {forged.plan.json}",
     "test_bad_input::test_a_tampered_hash_is_printed_far_enough_to_differ"),
    ("plan is not JSON", "explain {garbage.json}", "test_cli_planning::test_explain_refuses_bad_plan_and_graph_suffix"),
    ("--outputs inside a file (a folder that cannot be made)", "run {good.onnx} {clip.mp4} --plan dense --outputs {notes.onnx}/o.npz",
     "test_files::test_check_output_refuses_what_cannot_be_written"),
    ("--summary is an existing folder", "run {good.onnx} {clip.mp4} --plan dense --summary {folder.json}",
     "test_files::test_run_refuses_an_existing_folder_as_output_before_running"),
    ("profile -o in a folder that does not exist", "profile {good.onnx} --video {clip.mp4} -o {missing.mp4}/p.json",
     "test_files::test_check_output_refuses_what_cannot_be_written"),
    ("bench --json inside a file", "bench {good.onnx} {clip.mp4} --plan dense --json {notes.onnx}/b.json",
     "test_files::test_check_output_refuses_what_cannot_be_written"),
    ("streams --out is a file", "streams {clip.mp4} --model {good.onnx} --plan dense --out {notes.onnx}",
     "test_streams::test_streams_refuses_bad_options"),
    ("streams --model missing", "streams {clip.mp4} --model {missing.onnx} --out {folder}/s",
     "test_streams::test_streams_refuses_bad_options"),
    ("streams --retries -1", "streams {clip.mp4} --model {good.onnx} --out {folder}/s --retries -1",
     "test_streams::test_streams_refuses_bad_options"),
    ("streams list of sources missing", "streams {missing.mp4}.txt --model {good.onnx} --out {folder}/s",
     "test_streams::test_read_sources_refuses"),
    ("streams: one good source, one nobody listens to", "streams {clip.mp4} rtsp://127.0.0.1:9/x --model {good.onnx} "
     "--plan dense --retries 0 --out {folder}/s", "test_streams::test_a_bad_source_fails_alone_and_quickly"),
    ("streams --out inside a file", "streams {clip.mp4} --model {good.onnx} --plan dense --out {notes.onnx}/sub",
     "test_streams::test_an_out_that_cannot_be_made_is_refused_in_one_line"),
    ("streams --out where nothing can be made", "streams {clip.mp4} --model {good.onnx} --plan dense --out /proc/x",
     "test_streams::test_an_out_that_cannot_be_made_is_refused_in_one_line"),
    ("streams --out with a file where a stream's folder goes", "streams {clip.mp4} --model {good.onnx} --plan dense "
     "--out {blocked}", "test_streams::test_an_out_that_cannot_be_made_is_refused_in_one_line"),
    ("streams: a stream named summary.json", "streams {named.txt} --model {good.onnx} --plan dense --out {folder}/n",
     "test_streams::test_a_stream_cannot_take_the_runs_summary_name"),
    ("streams into an --out that holds a run", "streams {clip.mp4} --model {good.onnx} --plan dense --out {earlier}",
     "test_streams::test_overwrite_starts_again_and_resume_of_a_finished_run_runs_nothing"),
    ("streams --resume and --overwrite", "streams {clip.mp4} --model {good.onnx} --out {earlier} --resume --overwrite",
     "test_streams::test_overwrite_starts_again_and_resume_of_a_finished_run_runs_nothing"),
    ("streams --plan missing", "streams {clip.mp4} --model {good.onnx} --plan {missing.onnx}.plan.json --out {folder}/s",
     "test_streams::test_streams_refuses_bad_options"),
    ("streams --save-inputs without --outputs", "streams {clip.mp4} --model {good.onnx} --plan dense --save-inputs "
     "--out {folder}/s", "test_streams::test_a_stream_reports_its_pace_with_and_without_setup_and_saves_inputs"),
]


def run_cli(argv: str, files: dict[str, Path]) -> tuple[int, str]:
    names = {"{" + k + "}": str(v) for k, v in files.items()}
    parts = []
    for part in argv.split():
        for key, value in names.items():
            part = part.replace(key, value)
        parts.append(part)
    result = subprocess.run([sys.executable, "-m", "deluceva.cli", *parts], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in result.stderr.strip().splitlines() if line]
    shown = lines[-1] if lines else "(no message)"
    if len(lines) > 1:
        shown += f"  [{len(lines)} lines]"
    return result.returncode, shown.replace(str(files["good.onnx"].parent) + "/", "")


def api_cases() -> list[tuple[str, str, str, str]]:
    """Python API cases: (what, call, message, test)."""
    from deluceva.errors import DelucevaError
    from deluceva.session import Session

    rows = []

    def refused(what, call, make, test):
        try:
            make()
            rows.append((what, call, "(accepted)", test))
        except DelucevaError as error:
            rows.append((what, call, str(error), test))

    session = Session(conv_model(), plan="delta")
    refused("frame of the wrong shape", "session.run(np.zeros((1, 3, 8, 8)))",
            lambda: session.run(np.zeros((1, 3, 8, 8), np.float32)), "test_bad_input::test_frame_of_the_wrong_shape")
    refused("percentage 1.0", "session.run(frame, 1.0)",
            lambda: session.run(np.zeros((1, 3, 16, 16), np.float32), 1.0), "test_bad_input::test_percentage_outside_zero_one")
    session.run(np.zeros((1, 3, 16, 16), np.float32))
    refused("p > 0 without calibration", "session.run(next_frame, 0.5)",
            lambda: session.run(np.ones((1, 3, 16, 16), np.float32), 0.5),
            "test_thresholds::test_running_above_zero_needs_calibration")
    refused("threads=0", "Session(model, threads=0)", lambda: Session(conv_model(), threads=0),
            "test_bad_input::test_session_threads_must_be_a_positive_whole_number")
    refused("unknown plan name", "Session(model, plan='fast')", lambda: Session(conv_model(), plan="fast"),
            "test_bad_input::test_unknown_plan")
    refused("plan naming a node the model lacks", "Session(model, plan={'nope': 'delta'})",
            lambda: Session(conv_model(), plan={"nope": "delta"}), "test_bad_input::test_unknown_plan")
    nan_session = Session(conv_model(), plan="delta")
    frame = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    nan_session.run(frame)
    frame[0, 1, 5, 6] = np.nan
    outputs = nan_session.run(frame)[0]
    rows.append(("a NaN in a delta frame", "session.run(frame_with_nan)",
                 f"runs as a keyframe: {int(np.isnan(outputs).sum())} NaN outputs, as onnxruntime gives",
                 "test_bad_input::test_a_frame_that_is_not_finite_gives_what_onnxruntime_gives"))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        files = make_files(Path(folder))
        print("| what was tried | command | exit | what deluceva says | backed by |")
        print("|---|---|---|---|---|")
        for what, argv, test in CLI_CASES:
            status, line = run_cli(argv, files)
            command = "deluceva " + argv
            for key, path in files.items():
                command = command.replace("{" + key + "}", path.name)
            print(f"| {_cell(what)} | `{_cell(command)}` | {status} | {_cell(line)} | `{test}` |")
        for what, call, message, test in api_cases():
            print(f"| {_cell(what)} | `{_cell(call)}` | API | {_cell(message)} | `{test}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
