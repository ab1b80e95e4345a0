"""Per-operator table tests: each delta operator at p = 0 equals onnxruntime on a single-node model
over frame sequences with sparse changes (some at the borders), across attributes, with each
tensor in its own storage and at an offset in a shared one (as a Concat's inputs are)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deluceva.operators import UnsupportedOperator, delta_support, get_operator, registered_op_types
from operator_harness import make_spec, run_operator, sparse_frames

TOLERANCE = 1e-5
STORAGE = [0, 3]  # column offset of every tensor in its storage
rng = np.random.default_rng(1234)


def f32(*values):
    return np.array(values, np.float32)


def i64(*values):
    return np.array(values, np.int64)


def check(op_type, attrs, inputs, offset=0, **kwargs):
    result = run_operator(op_type, attrs, inputs, offset=offset, **kwargs)
    assert result.reason is None, result.reason
    assert len(result.errors) >= 5
    assert max(result.errors) <= TOLERANCE, result.errors
    # The sequence must really exercise the operator: some frames carry changes.
    assert max(result.densities) > 0


# -- Conv ------------------------------------------------------------------------------------

def conv_cases():
    for k, s, d, groups, pad in itertools.product([1, 3, 5, 7], [1, 2], [1, 2], ["1", "2", "dw"],
                                                  ["none", "sym", "asym", "SAME_UPPER", "SAME_LOWER", "VALID"]):
        if d > 1 and pad.startswith("SAME"):
            continue  # onnxruntime refuses dilation with SAME padding
        attrs = {"strides": [s, s], "dilations": [d, d], "kernel_shape": [k, k]}
        attrs["group"] = {"1": 1, "2": 2, "dw": 4}[groups]
        if pad == "sym":
            attrs["pads"] = [k // 2 * d] * 4
        elif pad == "asym":
            attrs["pads"] = [0, 1, 2, 0]
        elif pad != "none":
            attrs["auto_pad"] = pad
        yield pytest.param(attrs, id=f"k{k}s{s}d{d}g{groups}-{pad}")


@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("attrs", list(conv_cases()))
def test_conv(attrs, offset):
    height, width = (13, 11) if offset else (16, 21)
    span = (attrs["kernel_shape"][0] - 1) * attrs["dilations"][0] + 1
    if span > min(height, width) and attrs.get("auto_pad") not in ("SAME_UPPER", "SAME_LOWER"):
        pytest.skip("kernel larger than the image")
    out_channels = 4 if attrs["group"] == 4 else 6
    weight = rng.standard_normal((out_channels, 4 // attrs["group"], *attrs["kernel_shape"])).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    check("Conv", attrs, [(1, 4, height, width), weight, bias], offset)


def test_conv_rectangular_kernel_and_strides():
    weight = rng.standard_normal((5, 3, 3, 1)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 0], "kernel_shape": [3, 1]}
    check("Conv", attrs, [(1, 3, 15, 10), weight])


@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("dilations", [[2, 1], [1, 2]])
def test_conv_dilated_along_one_axis(dilations, offset):
    """Dilated rows with adjacent taps (and the other way round): the windows' rows are copied
    as contiguous blocks only where the taps of a row are adjacent."""
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    attrs = {"kernel_shape": [3, 3], "dilations": dilations, "pads": [dilations[0], dilations[1]] * 2}
    check("Conv", attrs, [(1, 4, 15, 12), weight], offset)


def test_conv_every_position_changes():
    """Every frame changes everywhere: the affected positions are read off the mark array in
    order rather than sorted, and every row is recomputed."""
    frames = [rng.standard_normal((1, 4, 13, 11)).astype(np.float32) for _ in range(6)]
    weight = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    result = run_operator("Conv", {"pads": [1, 1, 1, 1]}, [(1, 4, 13, 11), weight], values=[frames])
    assert max(result.errors) <= TOLERANCE and min(result.densities) == 1.0


def test_conv_kinds():
    """Each kind of delta Conv is chosen where it applies."""
    from deluceva.operators.conv import DEPTHWISE, GENERAL, POINTWISE, ConvGeometry

    def kind(weight_shape, **attrs):
        weight = np.zeros(weight_shape, np.float32)
        return ConvGeometry(make_spec("Conv", attrs, [(1, 4, 9, 9), weight], [(1, weight_shape[0], 9, 9)])).kind

    assert kind((6, 4, 1, 1)) == POINTWISE
    assert kind((6, 4, 1, 1), strides=[2, 2]) == GENERAL
    assert kind((4, 1, 3, 3), group=4, pads=[1, 1, 1, 1]) == DEPTHWISE
    assert kind((8, 1, 3, 3), group=4, pads=[1, 1, 1, 1]) == GENERAL  # a channel multiplier of 2
    assert kind((6, 2, 3, 3), group=2, pads=[1, 1, 1, 1]) == GENERAL


# -- Activations -------------------------------------------------------------------------------

ACTIVATIONS = {
    "Relu": ({}, 13), "LeakyRelu": ({"alpha": 0.2}, 13), "Sigmoid": ({}, 13), "Tanh": ({}, 13),
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, 13), "HardSwish": ({}, 14), "Elu": ({"alpha": 0.7}, 13),
    "Softplus": ({}, 13), "Softsign": ({}, 13), "Abs": ({}, 13), "Neg": ({}, 13),
}


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["unit", "saturating"])
@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("op_type", list(ACTIVATIONS))
def test_activation(op_type, offset, scale):
    attrs, opset = ACTIVATIONS[op_type]
    frames = [scale * f for f in sparse_frames(SMALL, 6, np.random.default_rng(len(op_type)))]
    check(op_type, attrs, [SMALL], offset, opset=opset, values=[frames])


@pytest.mark.parametrize("offset", STORAGE)
def test_prelu_and_clip(offset):
    check("PRelu", {}, [SMALL, rng.uniform(0, 1, (3, 1, 1)).astype(np.float32)], offset)
    check("PRelu", {}, [SMALL, f32(0.1)], offset)
    check("Clip", {}, [SMALL, f32(-0.5).reshape(()), f32(0.7).reshape(())], offset, opset=13)
    check("Clip", {}, [SMALL, None, f32(0.2).reshape(())], offset, opset=13)
    check("Clip", {"min": -0.3, "max": 0.4}, [SMALL], offset, opset=6)


# -- Elementwise binary ----------------------------------------------------------------------

SHAPE = (1, 3, 10, 13)
BINARY_OPERANDS = {
    "both-varying": [SHAPE, SHAPE],
    "scalar": [SHAPE, f32(1.5).reshape(())],
    "per-channel": [SHAPE, rng.uniform(0.5, 2, (3, 1, 1)).astype(np.float32)],
    "per-channel-4d": [SHAPE, rng.uniform(0.5, 2, (1, 3, 1, 1)).astype(np.float32)],
    "per-column": [SHAPE, rng.uniform(0.5, 2, (13,)).astype(np.float32)],
    "full-spatial": [SHAPE, rng.uniform(0.5, 2, SHAPE).astype(np.float32)],
    "constant-first": [rng.uniform(0.5, 2, (1, 3, 1, 13)).astype(np.float32), SHAPE],
}


@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("shared", [False, True], ids=["own-changes", "shared-changes"])
@pytest.mark.parametrize("operands", list(BINARY_OPERANDS), ids=list(BINARY_OPERANDS))
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_binary(op_type, operands, shared, offset):
    check(op_type, {}, BINARY_OPERANDS[operands], offset, shared_changes=shared, positive=True)


@pytest.mark.parametrize("offset", STORAGE)
def test_sum_variadic(offset):
    check("Sum", {}, [SHAPE, SHAPE, rng.standard_normal((3, 1, 1)).astype(np.float32), SHAPE], offset)


def test_binary_refuses_broadcast_of_a_varying_input():
    spec = make_spec("Mul", {}, [SHAPE, (1, 3, 1, 1)], [SHAPE])
    assert "broadcast of a varying input" in get_operator("Mul").supports(spec)


# -- Pools -----------------------------------------------------------------------------------

POOLS = {
    "pnet-2x2s2-ceil": {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
    "2x2s2": {"kernel_shape": [2, 2], "strides": [2, 2]},
    "3x3s2-pad-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
    "spp5": {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]},
    "spp9": {"kernel_shape": [9, 9], "pads": [4, 4, 4, 4]},
    "spp13": {"kernel_shape": [13, 13], "pads": [6, 6, 6, 6]},
    "same-upper": {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER"},
    "same-lower-s2": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    "valid-s2": {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "VALID"},
    "asym-pads": {"kernel_shape": [3, 2], "pads": [1, 0, 2, 1]},
    "asym-ceil": {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1},
}


@pytest.mark.parametrize("size", [(11, 13), (16, 16)], ids=["odd", "even"])
@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("pool", list(POOLS))
def test_maxpool(pool, offset, size):
    check("MaxPool", POOLS[pool], [(1, 3, *size)], offset)


def test_maxpool_dilated():
    check("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, [(1, 3, 11, 13)])


@pytest.mark.parametrize("include_pad", [0, 1])
@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("pool", list(POOLS))
def test_averagepool(pool, offset, include_pad):
    check("AveragePool", {**POOLS[pool], "count_include_pad": include_pad}, [(1, 3, 11, 13)], offset)


def test_global_pools_run_dense():
    """A global pool reads every position for each output: recomputing it costs a dense pass."""
    spec = make_spec("GlobalAveragePool", {}, [(1, 5, 11, 13)], [(1, 5, 1, 1)])
    assert delta_support(spec) == "no delta kernel for GlobalAveragePool"


def test_pool_reasons():
    spec = make_spec("AveragePool", {"kernel_shape": [3, 3], "dilations": [2, 2]}, [SHAPE], [SHAPE])
    assert "dilations" in get_operator("AveragePool").supports(spec)
    spec = make_spec("MaxPool", {"kernel_shape": [3, 3]}, [SHAPE], [SHAPE, SHAPE])
    assert "Indices" in get_operator("MaxPool").supports(spec)


# -- Concat, Split, Slice ---------------------------------------------------------------------

CHANNELS = (1, 4, 11, 13)


@pytest.mark.parametrize("offset", STORAGE)
def test_concat(offset):
    check("Concat", {"axis": 1}, [CHANNELS, (1, 2, 11, 13), CHANNELS], offset)
    check("Concat", {"axis": -3}, [CHANNELS, CHANNELS], offset, shared_changes=True)
    spec = make_spec("Concat", {"axis": 1}, [CHANNELS, np.ones((1, 2, 11, 13), np.float32)], [(1, 6, 11, 13)])
    assert "constant input" in delta_support(spec)


@pytest.mark.parametrize("offset", STORAGE)
def test_split(offset):
    check("Split", {"axis": 1}, [CHANNELS, i64(1, 3)], offset, n_outputs=2)
    check("Split", {"axis": 1, "split": [3, 1]}, [CHANNELS], offset, n_outputs=2, opset=11)
    check("Split", {"axis": -3}, [CHANNELS], offset, n_outputs=2)
    check("Split", {"axis": 3}, [CHANNELS, i64(6, 7)], offset, n_outputs=2)  # along the width: still copies


SLICES = {
    "channels": [i64(1), i64(3), i64(1)],
    "channels-negative-step": [i64(-1), i64(-10), i64(1), i64(-2)],
    "focus-00": [i64(0, 0), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-10": [i64(1, 0), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-01": [i64(0, 1), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-11": [i64(1, 1), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "crop-strided": [i64(2, 1, 1), i64(10, -2, 4), i64(2, 3, 1), i64(3, 2, 1)],
    "negative-axes": [i64(1, 3), i64(-1, 12), i64(-2, -1)],
    "spatial-negative-step": [i64(9, 12), i64(0, 0), i64(2, 3), i64(-2, -3)],
}


@pytest.mark.parametrize("offset", STORAGE)
@pytest.mark.parametrize("case", list(SLICES))
def test_slice(case, offset):
    check("Slice", {}, [CHANNELS, *SLICES[case]], offset)


def test_slice_opset9_attributes():
    check("Slice", {"starts": [1, 2], "ends": [9, 100], "axes": [2, 3]}, [CHANNELS], opset=9)


def test_shape_op_reasons():
    spec = make_spec("Slice", {}, [CHANNELS, (1,), i64(1)], [CHANNELS])
    assert "input 1 is not a 1xCxHxW float tensor" in delta_support(spec)
    assert "varying tensor beside its data input" in get_operator("Slice").supports(spec)
    spec = make_spec("Concat", {"axis": 2}, [CHANNELS, CHANNELS], [(1, 4, 22, 13)])
    assert "axis 2" in get_operator("Concat").supports(spec)


# -- Resize / Upsample ------------------------------------------------------------------------

SMALL = (1, 3, 7, 9)


@pytest.mark.parametrize("scales", [(2, 2), (3, 2), (1.5, 0.7)], ids=["2x", "3x2", "fractional"])
@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("transform", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
def test_resize_nearest(transform, nearest_mode, scales):
    attrs = {"mode": "nearest", "coordinate_transformation_mode": transform, "nearest_mode": nearest_mode}
    check("Resize", attrs, [SMALL, f32(), f32(1, 1, *scales)], opset=13)


@pytest.mark.parametrize("offset", STORAGE)
def test_resize_yolox_style(offset):
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    check("Resize", attrs, [SMALL, f32(), f32(1, 1, 2, 2)], offset, opset=11)


def test_resize_sizes_and_older_forms():
    sizes = i64(1, 3, 14, 5)
    check("Resize", {"mode": "nearest"}, [SMALL, None, None, sizes], opset=13)
    check("Resize", {"mode": "nearest"}, [SMALL, f32(), f32(), sizes], opset=11)
    check("Resize", {"mode": "nearest"}, [SMALL, f32(1, 1, 2, 3)], opset=10)
    check("Upsample", {"mode": "nearest"}, [SMALL, f32(1, 1, 2, 3)], opset=9)
    check("Resize", {"mode": "nearest"}, [SMALL, f32(), f32(1, 2, 2, 2)], opset=13)  # channels copied too


def test_resize_reasons():
    resize = get_operator("Resize")
    spec = make_spec("Resize", {"mode": "linear"}, [SMALL, f32(), f32(1, 1, 2, 2)], [(1, 3, 14, 18)], opset=13)
    assert "nearest only" in resize.supports(spec)


# -- Softmax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", STORAGE)
def test_softmax_channels(offset):
    check("Softmax", {"axis": 1}, [SMALL], offset, opset=13)


def test_softmax_reasons():
    softmax = get_operator("Softmax")
    assert "opset 13" in softmax.supports(make_spec("Softmax", {"axis": 1}, [SMALL], [SMALL], opset=11))
    assert "axis -1" in softmax.supports(make_spec("Softmax", {"axis": -1}, [SMALL], [SMALL], opset=13))


# -- Registry --------------------------------------------------------------------------------

def test_unknown_op_type_lists_registered_ones():
    with pytest.raises(UnsupportedOperator) as error:
        get_operator("LRN")
    message = str(error.value)
    assert "LRN" in message
    for op_type in ("Conv", "MaxPool", "Concat", "Resize", "Mul", "Slice"):
        assert op_type in registered_op_types()
        assert op_type in message


# -- Layout: SpaceToDepth, DepthToSpace, Gather -----------------------------------------------

@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("offset", STORAGE)
def test_space_to_depth(offset, block):
    check("SpaceToDepth", {"blocksize": block}, [(1, 3, 16, 24)], offset)
    check("DepthToSpace", {"blocksize": block}, [(1, 3 * block * block, 4, 6)], offset)


@pytest.mark.parametrize("offset", STORAGE)
def test_gather(offset):
    check("Gather", {"axis": 1}, [CHANNELS, i64(3, 0, -1, 1, 1)], offset)
    check("Gather", {"axis": 2}, [CHANNELS, i64(0, 5, 5, 10)], offset)
