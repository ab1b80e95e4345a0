"""A user's plan file is checked by code that `python -O` keeps, and the file formats' docstrings
give the schema version the code writes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from deluceva.planner import plan_file
from deluceva.profiles import profile as profile_file


def _plan() -> dict:
    """The smallest plan load_plan accepts: one node, two percentages."""
    return {"format": plan_file.FORMAT, "schema_version": plan_file.SCHEMA_VERSION,
            "model": {"path": "m.onnx", "sha256": "ab" * 32, "input_shape": [1, 3, 8, 8]},
            "threads": 1, "percentages": [0.0, 0.5],
            "nodes": [{"name": "conv", "op_type": "Conv", "variant": ["dense", "delta"], "delta_ms": [1.0, 0.5],
                       "density": [1.0, 0.4], "predicted_ms": [1.0, 0.5], "reason": ["", ""]}],
            "edges": [], "totals": {"plan_ms": [1.0, 0.5], "all_dense_ms": [1.0, 1.0], "all_delta_ms": [1.0, 0.5]}}


def _broken(change) -> dict:
    data = _plan()
    change(data)
    return data


BROKEN = {
    "a variant that is neither": lambda d: d["nodes"][0]["variant"].__setitem__(1, "fast"),
    "a percentage of 1.5": lambda d: d["percentages"].__setitem__(1, 1.5),
    "no percentages": lambda d: d.update(percentages=[]),
    "a node's lists of another length": lambda d: d["nodes"][0]["density"].pop(),
    "a 3-D input shape": lambda d: d["model"].update(input_shape=[1, 3, 8]),
    "an edge of three names": lambda d: d["edges"].append(["a", "b", "c"]),
    "totals of another length": lambda d: d["totals"]["plan_ms"].pop(),
}


@pytest.mark.parametrize("what", sorted(BROKEN))
def test_a_malformed_plan_is_refused_even_under_python_O(tmp_path, what):
    """Run under `python -O`, which strips `assert`: each malformed plan is still refused in one
    line, and the well-formed one loads."""
    good, bad = tmp_path / "good.plan.json", tmp_path / "bad.plan.json"
    good.write_text(json.dumps(_plan()))
    bad.write_text(json.dumps(_broken(BROKEN[what])))
    script = ("import sys\nfrom deluceva.errors import DelucevaError\nfrom deluceva.planner.plan_file import load_plan\n"
              "load_plan(sys.argv[1])\n"
              "try:\n    load_plan(sys.argv[2])\nexcept DelucevaError as error:\n    print(error)\n"
              "else:\n    print('accepted')\n")
    result = subprocess.run([sys.executable, "-O", "-c", script, str(good), str(bad)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{bad}: corrupt plan (missing or malformed fields)"


@pytest.mark.parametrize("module", [plan_file, profile_file])
def test_the_format_docstrings_give_the_schema_version_the_code_writes(module):
    said = {int(v) for v in re.findall(r"schema version (\d+)", module.__doc__)}
    example = {int(v) for v in re.findall(r'"schema_version": (\d+)', module.__doc__)}
    assert said == example == {module.SCHEMA_VERSION}


def test_one_session_per_distinct_plan_sharing_buffers():
    """The loop every caller (run's plan file, on-the-fly compile, profile --controller-out) uses."""
    from deluceva.demo import build_demo_model
    from deluceva.planner import load_model
    from deluceva.playback.loop import SessionsByPercentage

    model = load_model(build_demo_model(32, 48))
    dense = "dense"
    plans = SessionsByPercentage.from_variants(model, [(0.0, dense), (0.3, dense), (0.5, "delta"), (0.7, "delta"),
                                                       (0.9, dense)], threads=1, description="d")
    assert plans.percentages == [0.0, 0.5, 0.9] and plans.description == "d"
    assert len({id(s.executor.buffers) for s in plans.sessions}) == 1
