"""Output paths are checked before any work starts, and a write that fails at the end keeps the
result (in the temporary folder) and says where."""

from __future__ import annotations

import json
import pathlib
import tempfile

import numpy as np
import pytest
from test_bad_input import cli_refuses, conv_model

from deluceva.errors import DelucevaError
from deluceva.files import check_output, write_text


def test_check_output_refuses_what_cannot_be_written(tmp_path, monkeypatch):
    assert check_output(None, ".json", "--summary") is None
    assert check_output(tmp_path / "a.json", ".json", "--summary") == tmp_path / "a.json"
    with pytest.raises(DelucevaError, match="--summary file must end in .json"):
        check_output(tmp_path / "a.txt", ".json", "--summary")
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(DelucevaError, match="names an existing folder, not a file"):
        check_output(tmp_path / "folder.json", ".json", "--summary")
    with pytest.raises(DelucevaError, match="does not exist"):
        check_output(tmp_path / "nowhere" / "a.json", ".json", "--summary")
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(DelucevaError, match="notes.txt is a file, not a folder"):
        check_output(tmp_path / "notes.txt" / "a.json", ".json", "--summary")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)  # a read-only folder (root ignores chmod)
    with pytest.raises(DelucevaError, match="cannot write in folder .* \\(Permission denied\\)"):
        check_output(tmp_path / "a.json", ".json", "--summary")
    assert not list(tmp_path.glob("*.probe"))


def test_a_write_that_fails_at_the_end_keeps_the_result(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    original = pathlib.Path.replace

    def fail_here(self, other):
        if pathlib.Path(other).parent == tmp_path:
            raise PermissionError(13, "Permission denied")
        return original(self, other)

    monkeypatch.setattr(pathlib.Path, "replace", fail_here)
    with pytest.raises(DelucevaError) as caught:
        write_text(target, "{\"frames\": 3}\n")
    message = str(caught.value)
    assert "\n" not in message and "Permission denied" in message and "the result is in" in message
    rescued = pathlib.Path(message.rsplit("the result is in ", 1)[1])
    assert json.loads(rescued.read_text()) == {"frames": 3}
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))
    rescued.unlink()


def test_run_writes_outputs_even_when_the_summary_fails_at_the_end(tmp_path, monkeypatch, capsys):
    import onnx
    from deluceva.media.video import synthesise_clip

    model = tmp_path / "m.onnx"
    onnx.save(conv_model(dims=(1, 3, "h", "w")), model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=64, height=48, frames=4)
    out = tmp_path / "out" / "o.npz"
    out.parent.mkdir()
    summary = tmp_path / "late" / "s.json"
    summary.parent.mkdir()
    original = pathlib.Path.replace

    def fail_late(self, other):
        if pathlib.Path(other).parent == summary.parent:
            raise PermissionError(13, "Permission denied")
        return original(self, other)

    monkeypatch.setattr(pathlib.Path, "replace", fail_late)
    line = cli_refuses(["run", model, clip, "--plan", "dense", "--controller", "fixed", "--outputs", out,
                        "--summary", summary], capsys)
    assert "cannot write it (Permission denied); the result is in" in line
    with np.load(out) as data:
        assert data["y"].shape[0] == 4  # the outputs were written all the same
    rescued = pathlib.Path(line.rsplit("the result is in ", 1)[1])
    assert json.loads(rescued.read_text())["frames"] == 4
    rescued.unlink()


@pytest.mark.parametrize("option, name", [("--summary", "s.json"), ("--outputs", "o.npz")])
def test_run_refuses_an_existing_folder_as_output_before_running(tmp_path, option, name, capsys):
    import onnx
    from deluceva.media.video import synthesise_clip

    model = tmp_path / "m.onnx"
    onnx.save(conv_model(dims=(1, 3, "h", "w")), model)
    clip = synthesise_clip(tmp_path / "clip.mp4", width=64, height=48, frames=2)
    (tmp_path / name).mkdir()
    line = cli_refuses(["run", model, clip, "--plan", "dense", option, tmp_path / name], capsys)
    assert "names an existing folder" in line
    assert not list(tmp_path.glob("*.tmp"))
