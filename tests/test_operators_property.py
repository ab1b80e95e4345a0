"""Property-based tests: for random shapes, attributes, storage offsets and change patterns, the delta
Conv, MaxPool and Mul/Add at p = 0 equal onnxruntime every frame."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operator_harness import run_operator

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
offsets = st.sampled_from([0, 3])
sizes = st.integers(5, 19)
seeds = st.integers(0, 2**31 - 1)


def assert_exact(result):
    assert result.reason is None, result.reason
    assert max(result.errors) <= 1e-5, result.errors


@SETTINGS
@given(height=sizes, width=sizes, channels=st.integers(1, 5), kernel=st.sampled_from([1, 2, 3, 5]),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), depthwise=st.booleans(),
       pads=st.lists(st.integers(0, 2), min_size=4, max_size=4), offset=offsets, seed=seeds)
def test_conv_property(height, width, channels, kernel, stride, dilation, depthwise, pads, offset, seed):
    span = (kernel - 1) * dilation + 1
    if span > min(height + pads[0] + pads[2], width + pads[1] + pads[3]):
        return
    group = channels if depthwise else 1
    out_channels = channels if depthwise else 3
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((out_channels, channels // group, kernel, kernel)).astype(np.float32)
    attrs = {"strides": [stride, stride], "dilations": [dilation, dilation], "group": group, "pads": pads}
    assert_exact(run_operator("Conv", attrs, [(1, channels, height, width), weight], offset=offset, seed=seed))


@SETTINGS
@given(height=sizes, width=sizes, kernel=st.integers(1, 5), stride=st.integers(1, 3), ceil=st.booleans(),
       pad=st.integers(0, 2), offset=offsets, seed=seeds)
def test_maxpool_property(height, width, kernel, stride, ceil, pad, offset, seed):
    pad = min(pad, kernel - 1)  # ONNX: padding smaller than the kernel
    attrs = {"kernel_shape": [kernel, kernel], "strides": [stride, stride], "pads": [pad] * 4, "ceil_mode": int(ceil)}
    assert_exact(run_operator("MaxPool", attrs, [(1, 2, height, width)], offset=offset, seed=seed))


@SETTINGS
@given(height=sizes, width=sizes, op_type=st.sampled_from(["Mul", "Add"]), shared=st.booleans(),
       constant=st.sampled_from([None, "scalar", "channel", "row", "full"]), offset=offsets, seed=seeds)
def test_binary_property(height, width, op_type, shared, constant, offset, seed):
    shape = (1, 3, height, width)
    rng = np.random.default_rng(seed)
    other = {
        None: shape,
        "scalar": np.float32(rng.standard_normal()),
        "channel": rng.standard_normal((3, 1, 1)).astype(np.float32),
        "row": rng.standard_normal((1, 1, height, 1)).astype(np.float32),
        "full": rng.standard_normal(shape).astype(np.float32),
    }[constant]
    result = run_operator(op_type, {}, [shape, other], offset=offset, seed=seed, shared_changes=shared)
    assert_exact(result)
