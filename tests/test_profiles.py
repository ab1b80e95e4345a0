"""Profiles: measuring on generated frames, the JSON format and its validation, the cost model, plans."""

from __future__ import annotations

import copy
import json
import time
import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from deluceva.errors import DelucevaError
from deluceva.planner import load_model
from deluceva.planner.plan_file import compile_plan, load_plan, plans_for_run
from deluceva.planner.cost_model import CostModel
from deluceva.profiles import Profile, load_profile, measure_profile

PERCENTAGES = (0.0, 0.5, 0.9)


def tiny_model(seed: int = 0, channels: int = 8, size: int = 48):
    """Conv -> Relu -> Conv -> LRN (no delta kernel) -> Conv -> Add(residual)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32), "W1"),
             numpy_helper.from_array((rng.standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32), "W2"),
             numpy_helper.from_array((rng.standard_normal((channels, channels, 1, 1)) * 0.1).astype(np.float32), "W3")]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "W2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("LRN", ["c"], ["d"], size=3, name="lrn"),
             helper.make_node("Conv", ["d", "W3"], ["e"], name="conv3"),
             helper.make_node("Add", ["e", "b"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def moving_frames(count: int = 10, size: int = 48, seed: int = 1) -> list[np.ndarray]:
    """A static background with a moving square and some flicker of varied strength."""
    rng = np.random.default_rng(seed)
    background = rng.standard_normal((1, 3, size, size)).astype(np.float32)
    frames = []
    for i in range(count):
        frame = background.copy()
        y = (4 * i) % (size - 10)
        frame[..., y:y + 10, 6:16] += 1.5
        flicker = rng.random((size // 8, size // 8)) < 0.3
        frame += (np.kron(flicker * rng.random((size // 8, size // 8)), np.ones((8, 8))) * 0.2).astype(np.float32)
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def model():
    return load_model(tiny_model())


@pytest.fixture(scope="module")
def profile(model):
    return measure_profile(model, moving_frames(10), percentages=PERCENTAGES, dense_frames=3,
                           conversion_pairs=2, progress=False)


def test_profile_measures_every_node(profile, model):
    assert profile.model["sha256"] == model.sha256
    assert profile.model["input_shape"] == [1, 3, 48, 48]
    assert profile.percentages == list(PERCENTAGES)
    assert set(profile.nodes) == {"conv1", "relu1", "conv2", "lrn", "conv3", "add"}
    for key in ("cpu_model", "cores", "threads", "onnxruntime", "numpy", "deluceva"):
        assert profile.machine[key]
    lrn = profile.nodes["lrn"]
    assert lrn["delta_ms"] is None and lrn["delta_reason"] == "no delta kernel for LRN"
    conv = profile.nodes["conv2"]
    assert len(conv["delta_ms"]) == 3 and all(t > 0 for t in conv["delta_ms"])
    assert conv["dense_ms"] >= 0 and profile.segment_overhead_ms > 0 and profile.dense_model_ms > 0
    # filtering holds changes back: the input density falls as p rises
    assert conv["in_density"][0] > conv["in_density"][2]
    assert all(len(ms) == 7 for ms in conv["samples"]["ms"])  # fit frames minus the keyframe
    for tensor in ("x", "a", "b", "c", "d", "e", "y"):
        entry = profile.tensors[tensor]
        assert len(entry["to_delta_ms"]) == 3 and min(entry["to_delta_ms"]) > 0


def test_profile_validates_on_held_out_frames(profile):
    v = profile.validation
    assert profile.settings["holdout_frames"] == 2
    assert v["all_delta"]["percentages"] == list(PERCENTAGES)
    assert all(m > 0 for m in v["all_delta"]["measured_ms"])
    assert all(m > 0 for m in v["all_delta"]["predicted_ms"])
    assert v["all_dense"]["measured_ms"] > 0 and v["all_dense"]["predicted_ms"] > 0
    # The cost model predicts frames it never saw: within 40% all dense, and the median over the
    # all-delta percentages within 50%. On this sub-millisecond model the dense LRN and the
    # per-frame overhead dominate, so this catches gross failures (wrong units, wrong plan, a
    # broken dense scale); the delta fit's own accuracy is tested on known samples below.
    assert abs(v["all_dense"]["error_pct"]) <= 40, v
    assert float(np.median(np.abs(v["all_delta"]["error_pct"]))) <= 50, v


def test_profile_round_trip(profile, tmp_path):
    path = profile.save(tmp_path / "tiny.profile.json")
    loaded = load_profile(path)
    assert loaded.to_json() == json.loads(json.dumps(profile.to_json()))
    assert loaded.path == str(path)


def test_measure_refuses_too_few_frames_and_bad_percentages(model):
    with pytest.raises(DelucevaError, match="at least 4 frames"):
        measure_profile(model, moving_frames(3), progress=False)
    with pytest.raises(DelucevaError, match=r"\[0, 1\)"):
        measure_profile(model, moving_frames(5), percentages=[0.0, 1.0], progress=False)
    with pytest.raises(DelucevaError, match="frame has shape"):
        measure_profile(model, [np.zeros((1, 3, 8, 8), np.float32)] * 5, progress=False)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.clear(), "not a deluceva profile"),
    (lambda d: d.update(format="deluceva-plan"), "not a deluceva profile"),
    (lambda d: d.update(schema_version=99), "schema version 99"),
    (lambda d: d["model"].update(sha256="abc"), "corrupt profile .model sha256"),
    (lambda d: d.update(percentages=[0.9, 0.0, 0.5]), "corrupt profile .percentages"),
    (lambda d: d["nodes"]["conv2"].update(dense_ms=-1), "corrupt profile .node 'conv2' dense_ms"),
    (lambda d: d["nodes"]["conv2"].update(delta_ms=[1.0]), "node 'conv2' delta_ms must be 3"),
    (lambda d: d["tensors"]["a"].pop("to_dense_ms"), "tensor 'a' to_dense_ms"),
    (lambda d: d.pop("nodes"), "'nodes' missing"),
])
def test_load_refuses_corrupt_profiles(profile, tmp_path, mutate, message):
    data = copy.deepcopy(profile.to_json())
    mutate(data)
    path = tmp_path / "bad.profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DelucevaError, match=message) as error:
        load_profile(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_refuses_missing_and_non_json(tmp_path):
    with pytest.raises(DelucevaError, match="no such file"):
        load_profile(tmp_path / "none.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\x00\x01{not json")
    with pytest.raises(DelucevaError, match="garbage.json: not a deluceva profile"):
        load_profile(garbage)


def test_profile_refuses_another_model(profile):
    other = load_model(tiny_model(seed=5))
    with pytest.raises(DelucevaError, match="profile is for another model"):
        profile.check_model(other.sha256, other.input_shape)
    with pytest.raises(DelucevaError, match="input shape"):
        profile.check_model(profile.model["sha256"], (1, 3, 64, 64))


def synthetic_profile(samples_density, samples_ms) -> Profile:
    node = {"op_type": "Conv", "flops": 1, "output_shape": [1, 1, 8, 8], "dense_ms": 1.0, "delta_reason": None,
            "delta_ms": [float(np.mean(m)) for m in samples_ms],
            "in_density": [float(np.mean(d)) for d in samples_density],
            "out_density": [float(np.mean(d)) for d in samples_density],
            "samples": {"density": samples_density, "ms": samples_ms}}
    return Profile(model={"path": "m", "sha256": "0" * 64, "input_shape": [1, 1, 8, 8]}, machine={},
                   settings={}, percentages=[0.0, 0.5, 0.9], dense_model_ms=1.0, segment_overhead_ms=0.01,
                   nodes={"n": node}, tensors={"t": {"to_delta_ms": [0.1, 0.2, 0.3], "to_dense_ms": [1.0, 1.0, 2.0],
                                                     "density": [1.0, 0.5, 0.1]}})


def test_cost_model_fits_time_against_density():
    rng = np.random.default_rng(0)
    densities = [list(rng.uniform(lo, lo + 0.2, 20)) for lo in (0.6, 0.3, 0.0)]
    ms = [[0.5 + 2.0 * d + rng.normal(0, 0.01) for d in ds] for ds in densities]
    costs = CostModel(synthetic_profile(densities, ms))
    assert costs.delta_ms("n", density=0.5) == pytest.approx(1.5, abs=0.08)
    assert costs.delta_ms("n", density=0.02) == pytest.approx(0.54, abs=0.08)
    grid = [costs.delta_ms("n", density=d) for d in np.linspace(0, 1, 21)]
    assert all(a <= b for a, b in zip(grid, grid[1:]))  # more change never predicts less time
    # the expected density at p interpolates the measured means
    d0, d5 = np.mean(densities[0]), np.mean(densities[1])
    assert costs.density("n", 0.25) == pytest.approx((d0 + d5) / 2)
    assert costs.delta_ms("n", 0.25) == pytest.approx(0.5 + 2.0 * (d0 + d5) / 2, abs=0.08)
    assert costs.to_dense_ms("t", 0.7) == pytest.approx(1.5)
    # dense costs are scaled so that they sum, with one session call, to the whole model's time
    assert costs.dense_ms("n") == pytest.approx(1.0 - 0.01)


def test_dense_costs_split_alone_time_into_share_and_boundary():
    """A node alone costs its share of the whole model plus its tensors' values at a session's
    boundary; the per-value cost is the one that makes the shares add up to the whole model."""
    from types import SimpleNamespace

    import networkx as nx

    graph = nx.DiGraph()
    graph.add_node("a", inputs=["x"], outputs=["y"])
    graph.add_node("b", inputs=["y", "w"], outputs=["z"])
    graph.add_edge("a", "b")
    graph.graph["model"] = SimpleNamespace(shapes={"x": (1, 1, 1000, 1000), "y": (1, 1, 1000, 1000),
                                                   "z": (1, 1, 500, 1000), "w": (8, 1, 3, 3)},
                                           constants={"w": None})
    node = {"op_type": "Conv", "flops": 1, "output_shape": None, "delta_reason": None, "delta_ms": None}
    profile = Profile(model={"path": "m", "sha256": "0" * 64, "input_shape": [1, 1, 1000, 1000]}, machine={},
                      settings={}, percentages=[0.0], dense_model_ms=2.01, segment_overhead_ms=0.01,
                      nodes={"a": {**node, "dense_ms": 3.0}, "b": {**node, "dense_ms": 1.0}}, tensors={})
    costs = CostModel(profile, graph)
    assert costs.dense_ms("a") + costs.dense_ms("b") == pytest.approx(2.0)
    per_value = (4.0 - 2.0) / 3.5e6  # the excess over the values a and b read and write (not w's)
    assert costs.boundary_ms("y") == pytest.approx(1e6 * per_value)
    assert costs.boundary_ms("w") == 0.0
    for name, tensors, alone in (("a", "xy", 3.0), ("b", "yz", 1.0)):
        assert costs.dense_ms(name) + sum(costs.boundary_ms(t) for t in tensors) == pytest.approx(alone)
    # without the DAG: every node scaled by one factor
    plain = CostModel(profile)
    assert plain.dense_ms("a") == pytest.approx(1.5) and plain.boundary_ms("y") == 0.0


def test_compile_plan_and_run_it(model, profile, tmp_path):
    plan = compile_plan(model, profile)
    # the measured percentages, and those between them that the cost model interpolates
    compiled = [0.0, 0.5, 0.6, 0.65, 0.7, 0.75, 0.85, 0.9]
    assert plan.percentages == compiled
    path = plan.save(tmp_path / "tiny.plan.json")
    loaded = load_plan(path)
    lrn = next(n for n in loaded.data["nodes"] if n["name"] == "lrn")
    n = len(compiled)
    assert lrn["variant"] == ["dense"] * n and lrn["reason"] == ["no delta kernel for LRN"] * n
    from deluceva.planner.plan_file import MIN_GAIN

    for i, _ in enumerate(compiled):
        totals = {k: v[i] for k, v in loaded.data["totals"].items()}
        assert totals["plan_ms"] <= totals["all_dense_ms"] + 1e-9
        # Never predicted slower than all delta, but where all delta saves under MIN_GAIN: then
        # the plan is all dense, within the cost model's error of it.
        assert totals["plan_ms"] <= totals["all_delta_ms"] + 1e-9 or (
            totals["plan_ms"] == totals["all_dense_ms"] and totals["all_delta_ms"] > (1 - MIN_GAIN) * totals["all_dense_ms"])
    assert loaded.nearest_index(0.78) == 5 and loaded.nearest_index(0.2) == 0  # the nearest compiled percentage
    from deluceva.session import Session

    loaded.check_model(model)
    session = Session(model, plan=loaded.variants_for(0.0))
    frames = moving_frames(3)
    dense = load_model(tiny_model())

    reference = Session(dense, plan="dense")
    for frame in frames:
        np.testing.assert_allclose(session.run(frame, 0.0)[0], reference.run(frame)[0], rtol=1e-4, atol=1e-4)
    entries = plans_for_run(path, model)
    assert [p for p, _ in entries] == compiled


def test_plan_refuses_another_model_and_shape(model, profile, tmp_path):
    path = compile_plan(model, profile, [0.0]).save(tmp_path / "p.plan.json")
    plan = load_plan(path)
    with pytest.raises(DelucevaError, match="plan was compiled for another model"):
        plan.check_model(load_model(tiny_model(seed=3)))
    plan.data["model"]["input_shape"] = [1, 3, 64, 64]  # as if compiled for a larger input
    with pytest.raises(DelucevaError, match=r"compiled for input shape \(1, 3, 64, 64\), not \(1, 3, 48, 48\)"):
        plan.check_model(model)
    with pytest.raises(DelucevaError, match="outside"):
        plan.variants_for(1.0)


def test_compile_refuses_foreign_profile_unless_forced(model, profile):
    foreign = copy.deepcopy(profile)
    foreign.machine = dict(profile.machine, cpu_model="Some Other CPU", cores=128)
    with pytest.raises(DelucevaError, match="another machine .cpu_model"):
        compile_plan(model, foreign)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = compile_plan(model, foreign, force=True)
    assert any("another machine" in str(w.message) for w in caught)
    assert plan.data["profile"]["machine"]["cpu_model"] == "Some Other CPU"
    with pytest.raises(DelucevaError, match="profile is for another model"):
        compile_plan(load_model(tiny_model(seed=9)), profile)
    with pytest.raises(DelucevaError, match="outside"):
        compile_plan(model, profile, [1.5])


@pytest.mark.slow
def test_profile_yolox_nano_60_frames_under_five_minutes(shared_data, tmp_path):
    from deluceva.commands.profile import calibration_inputs

    model, inputs = calibration_inputs(str(shared_data / "models" / "yolox_nano_coco_416.onnx"),
                                       str(shared_data / "videos" / "intersection_cctv_640x480_909f.mp4"),
                                       60, "yolox")
    start = time.perf_counter()
    profile = measure_profile(model, inputs, progress=False)
    elapsed = time.perf_counter() - start
    profile.save(tmp_path / "yolox.profile.json")
    print(f"profile: {elapsed:.1f} s; cost model mean |error| {profile.validation['mean_abs_error_pct']}%")
    assert elapsed < 300
    plan = compile_plan(model, profile)
    totals = plan.data["totals"]
    assert all(a <= b + 1e-9 for a, b in zip(totals["plan_ms"], totals["all_dense_ms"]))
