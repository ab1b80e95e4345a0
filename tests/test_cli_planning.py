"""`deluceva profile`, `compile`, `explain` from the command line, and their refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path
import sys

import numpy as np
import onnx
import pytest

from deluceva.cli import main
from deluceva.planner import load_model
from deluceva.media.video import write_test_clip
from tests.test_profiles import tiny_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model, a small clip, its profile and plan, made through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    model = folder / "tiny.onnx"
    onnx.save(tiny_model(size=48), model)
    rng = np.random.default_rng(0)
    background = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    frames = []
    for i in range(10):
        frame = background.copy()
        frame[4 * i:4 * i + 12, 8:20] = 250
        frames.append(frame)
    video = write_test_clip(folder / "clip.mp4", frames)
    assert main(["profile", str(model), "--video", str(video), "--frames", "10",
                 "--percentages", "0", "0.9"]) == 0
    profile = folder / "tiny.profile.json"  # the default: beside the model
    plan = folder / "tiny.plan.json"
    assert main(["compile", str(model), "--profile", str(profile), "-o", str(plan)]) == 0
    return {"folder": folder, "model": model, "video": video, "profile": profile, "plan": plan}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refusals
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert any(all(w in line for w in words) for line in lines), err
    assert len([line for line in lines if line.startswith("deluceva: error")]) == 1


def test_profile_compile_explain(workspace, capsys, tmp_path):
    data = json.loads(workspace["profile"].read_text())
    assert data["format"] == "deluceva-profile" and data["percentages"] == [0.0, 0.9]
    plan = json.loads(workspace["plan"].read_text())
    assert plan["model"]["sha256"] == load_model(workspace["model"]).sha256
    # compiled for the measured percentages and, by default, those between them
    assert plan["percentages"] == [0.0, 0.6, 0.65, 0.7, 0.75, 0.85, 0.9]
    graph = tmp_path / "plan.svg"
    code, out, err = run_cli(["explain", workspace["plan"], "--percentage", "0.9", "--graph", graph], capsys)
    assert code == 0, err
    assert out.splitlines()[0].split() == ["node", "op", "output", "shape", "variant", "predicted", "ms", "measured",
                                           "ms", "dense", "ms", "delta", "ms", "density", "reason"]
    assert "no delta kernel for LRN" in out and "plan for p=0.9" in out and "all dense" in out
    # Each node's measured ms is what the profile measured for its variant at p = 0.9.
    profile = json.loads(Path(workspace["profile"]).read_text())
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.strip()}
    for name, node in profile["nodes"].items():
        variant, measured = rows[name][3], rows[name][5]
        expected = node["dense_ms"] if variant == "dense" else node["delta_ms"][profile["percentages"].index(0.9)]
        assert abs(float(measured) - expected) <= 0.0006, name  # printed to 3 decimals
    assert graph.read_text().lstrip().startswith("<?xml")
    png = tmp_path / "plan.png"
    assert run_cli(["explain", workspace["plan"], "--graph", png], capsys)[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_corrupt_profile_refused(workspace, capsys, tmp_path):
    bad = tmp_path / "bad.profile.json"
    bad.write_text('{"format": "deluceva-profile", "schema_version": 1, "model": ')
    code, _, err = run_cli(["compile", workspace["model"], "--profile", bad, "-o", tmp_path / "p.json"], capsys)
    assert_refused(code, err, str(bad), "not a deluceva profile")


def test_foreign_profile_refused_unless_forced(workspace, capsys, tmp_path):
    data = json.loads(workspace["profile"].read_text())
    data["machine"]["cpu_model"] = "Another CPU 9000"
    foreign = tmp_path / "foreign.profile.json"
    foreign.write_text(json.dumps(data))
    out = tmp_path / "p.json"
    code, _, err = run_cli(["compile", workspace["model"], "--profile", foreign, "-o", out], capsys)
    assert_refused(code, err, str(foreign), "another machine", "--force")
    assert not out.exists()
    code, _, err = run_cli(["compile", workspace["model"], "--profile", foreign, "--force", "-o", out], capsys)
    assert code == 0 and "warning" in err and "another machine" in err and out.exists()


def test_profile_of_another_model_refused(workspace, capsys, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(tiny_model(seed=4, size=48), other)
    code, _, err = run_cli(["compile", other, "--profile", workspace["profile"], "-o", tmp_path / "p.json"], capsys)
    assert_refused(code, err, "profile is for another model")


def test_plan_for_another_model_refused(workspace):
    from deluceva.errors import DelucevaError
    from deluceva.planner.plan_file import load_plan, plans_for_run

    other = load_model(tiny_model(seed=4, size=48))
    with pytest.raises(DelucevaError, match="plan was compiled for another model"):
        plans_for_run(workspace["plan"], other)
    with pytest.raises(DelucevaError, match="plan was compiled for another model"):
        load_plan(workspace["plan"]).check_model(other)


@pytest.mark.parametrize("argv_tail", [["--percentage", "1.0"], ["--percentage", "-0.1"], ["--percentage", "x"]])
def test_percentage_out_of_range_refused(workspace, capsys, tmp_path, argv_tail):
    code, _, err = run_cli(["compile", workspace["model"], "--profile", workspace["profile"],
                            "-o", tmp_path / "p.json", *argv_tail], capsys)
    assert code == 2 and "Traceback" not in err
    assert "outside [0, 1)" in err or "not a number" in err
    code, _, err = run_cli(["profile", workspace["model"], "--video", workspace["video"],
                            "--percentages", argv_tail[1]], capsys)
    assert code == 2 and "Traceback" not in err


def test_explain_refuses_bad_plan_and_graph_suffix(workspace, capsys, tmp_path):
    code, _, err = run_cli(["explain", workspace["profile"]], capsys)
    assert_refused(code, err, str(workspace["profile"]), "not a deluceva plan")
    code, _, err = run_cli(["explain", workspace["plan"], "--graph", tmp_path / "g.jpg"], capsys)
    assert_refused(code, err, "g.jpg", ".png or .svg")
    code, _, err = run_cli(["explain", tmp_path / "missing.json"], capsys)
    assert_refused(code, err, "missing.json", "no such file")


def test_explain_graph_without_matplotlib_is_one_line(workspace, capsys, tmp_path, monkeypatch):
    # matplotlib is optional (the `plot` extra); without it --graph must say so, not trace back.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_cli(["explain", workspace["plan"], "--graph", tmp_path / "g.png"], capsys)
    assert_refused(code, err, "--graph needs matplotlib")


def test_explain_shows_each_steps_forms_from_a_run_summary(workspace, capsys, tmp_path):
    summary = tmp_path / "summary.json"
    code, _, err = run_cli(["run", workspace["model"], workspace["video"], "--plan", "delta", "--summary", summary,
                            "--frames", "8"], capsys)
    assert code == 0, err
    data = json.loads(summary.read_text())
    assert data["step_forms"] == {}  # the tiny model's Convs have no dense form (no image stem, no narrow depthwise)
    data["step_forms"] = {"delta[conv1]": {"delta": 3, "dense": 5}}
    summary.write_text(json.dumps(data))
    code, out, err = run_cli(["explain", workspace["plan"], "--summary", summary], capsys)
    assert code == 0, err
    assert "frames delta/dense form" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if line.split()}
    assert "3/5" in rows["conv1"] and "3/5" not in rows["conv2"]
    code, _, err = run_cli(["explain", workspace["plan"], "--summary", workspace["profile"]], capsys)
    assert_refused(code, err, "profile.json", "not a run summary")
