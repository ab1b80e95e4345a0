"""Per-operator table tests: each delta operator at p = 0 equals onnxruntime on a single-node model
over frame sequences with sparse changes (some at the borders), across attributes and tile sizes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from deluceva.operators import UnsupportedOperator, get_operator, registered_op_types
from deluceva.operators.testing import make_spec, run_operator

TOLERANCE = 1e-5
TILES = [1, 2, 4, 8]
rng = np.random.default_rng(1234)


def f32(*values):
    return np.array(values, np.float32)


def i64(*values):
    return np.array(values, np.int64)


def check(op_type, attrs, inputs, tile, **kwargs):
    result = run_operator(op_type, attrs, inputs, tile=tile, **kwargs)
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


@pytest.mark.parametrize("tile", [1, 4, 8])
@pytest.mark.parametrize("attrs", list(conv_cases()))
def test_conv(attrs, tile):
    height, width = (13, 11) if tile != 8 else (16, 21)  # odd sizes: partial edge tiles
    span = (attrs["kernel_shape"][0] - 1) * attrs["dilations"][0] + 1
    if span > min(height, width) and attrs.get("auto_pad") not in ("SAME_UPPER", "SAME_LOWER"):
        pytest.skip("kernel larger than the image")
    out_channels = 4 if attrs["group"] == 4 else 6
    weight = rng.standard_normal((out_channels, 4 // attrs["group"], *attrs["kernel_shape"])).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    check("Conv", attrs, [(1, 4, height, width), weight, bias], tile)


def test_conv_rectangular_kernel_and_strides():
    weight = rng.standard_normal((5, 3, 3, 1)).astype(np.float32)
    attrs = {"strides": [2, 1], "pads": [1, 0, 1, 0], "kernel_shape": [3, 1]}
    check("Conv", attrs, [(1, 3, 15, 10), weight], 4)


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


@pytest.mark.parametrize("tile", [1, 4, 8])
@pytest.mark.parametrize("shared", [False, True], ids=["own-changes", "shared-changes"])
@pytest.mark.parametrize("operands", list(BINARY_OPERANDS), ids=list(BINARY_OPERANDS))
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_binary(op_type, operands, shared, tile):
    check(op_type, {}, BINARY_OPERANDS[operands], tile, shared_changes=shared, positive=True)


@pytest.mark.parametrize("tile", TILES)
def test_sum_variadic(tile):
    check("Sum", {}, [SHAPE, SHAPE, rng.standard_normal((3, 1, 1)).astype(np.float32), SHAPE], tile)


def test_binary_refuses_broadcast_of_a_varying_input():
    spec = make_spec("Mul", {}, [SHAPE, (1, 3, 1, 1)], [SHAPE], 4)
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
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("pool", list(POOLS))
def test_maxpool(pool, tile, size):
    check("MaxPool", POOLS[pool], [(1, 3, *size)], tile)


@pytest.mark.parametrize("tile", [1, 4])
def test_maxpool_dilated(tile):
    check("MaxPool", {"kernel_shape": [3, 3], "dilations": [2, 2], "pads": [2, 2, 2, 2]}, [(1, 3, 11, 13)], tile)


@pytest.mark.parametrize("include_pad", [0, 1])
@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("pool", list(POOLS))
def test_averagepool(pool, tile, include_pad):
    check("AveragePool", {**POOLS[pool], "count_include_pad": include_pad}, [(1, 3, 11, 13)], tile)


@pytest.mark.parametrize("tile", TILES)
def test_global_average_pool(tile):
    check("GlobalAveragePool", {}, [(1, 5, 11, 13)], tile)


def test_pool_reasons():
    spec = make_spec("AveragePool", {"kernel_shape": [3, 3], "dilations": [2, 2]}, [SHAPE], [SHAPE], 4)
    assert "dilations" in get_operator("AveragePool").supports(spec)
    spec = make_spec("MaxPool", {"kernel_shape": [3, 3]}, [SHAPE], [SHAPE, SHAPE], 4)
    assert "Indices" in get_operator("MaxPool").supports(spec)


# -- Concat, Split, Slice ---------------------------------------------------------------------

CHANNELS = (1, 4, 11, 13)


@pytest.mark.parametrize("tile", TILES)
def test_concat(tile):
    check("Concat", {"axis": 1}, [CHANNELS, (1, 2, 11, 13), CHANNELS], tile)
    check("Concat", {"axis": -3}, [CHANNELS, CHANNELS], tile, shared_changes=True)
    check("Concat", {"axis": 1}, [CHANNELS, np.ones((1, 2, 11, 13), np.float32)], tile)


@pytest.mark.parametrize("tile", TILES)
def test_split(tile):
    check("Split", {"axis": 1}, [CHANNELS, i64(1, 3)], tile, n_outputs=2)
    check("Split", {"axis": 1, "split": [3, 1]}, [CHANNELS], tile, n_outputs=2, opset=11)
    check("Split", {"axis": -3}, [CHANNELS], tile, n_outputs=2)


SLICES = {
    "channels": [i64(1), i64(3), i64(1)],
    "channels-negative-step": [i64(-1), i64(-10), i64(1), i64(-2)],
    "focus-00": [i64(0, 0), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-10": [i64(1, 0), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-01": [i64(0, 1), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "focus-11": [i64(1, 1), i64(2**31, 2**31), i64(2, 3), i64(2, 2)],
    "crop-strided": [i64(2, 1, 1), i64(10, -2, 4), i64(2, 3, 1), i64(3, 2, 1)],
    "negative-axes": [i64(1, 3), i64(-1, 12), i64(-2, -1)],
}


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("case", list(SLICES))
def test_slice(case, tile):
    check("Slice", {}, [CHANNELS, *SLICES[case]], tile)


@pytest.mark.parametrize("tile", [1, 4])
def test_slice_opset9_attributes(tile):
    check("Slice", {"starts": [1, 2], "ends": [9, 100], "axes": [2, 3]}, [CHANNELS], tile, opset=9)


def test_shape_op_reasons():
    slice_op = get_operator("Slice")
    spec = make_spec("Slice", {}, [CHANNELS, i64(5), i64(0), i64(2), i64(-1)], [(1, 4, 5, 13)], 4)
    assert "negative step" in slice_op.supports(spec)
    spec = make_spec("Slice", {}, [CHANNELS, i64(0), i64(1), i64(0)], [CHANNELS], 4)
    assert "batch axis" in slice_op.supports(spec)
    spec = make_spec("Slice", {}, [CHANNELS, (1,), i64(1)], [CHANNELS], 4)
    assert "not constant" in slice_op.supports(spec)
    spec = make_spec("Concat", {"axis": 2}, [CHANNELS, CHANNELS], [(1, 4, 22, 13)], 4)
    assert "axis 2" in get_operator("Concat").supports(spec)
    spec = make_spec("Split", {"axis": 3}, [CHANNELS], [(1, 4, 11, 6), (1, 4, 11, 7)], 4)
    assert "axis 3" in get_operator("Split").supports(spec)


# -- Resize / Upsample ------------------------------------------------------------------------

SMALL = (1, 3, 7, 9)


@pytest.mark.parametrize("scales", [(2, 2), (3, 2), (1.5, 0.7)], ids=["2x", "3x2", "fractional"])
@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("transform", ["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
@pytest.mark.parametrize("tile", [1, 2, 4])
def test_resize_nearest(transform, nearest_mode, scales, tile):
    attrs = {"mode": "nearest", "coordinate_transformation_mode": transform, "nearest_mode": nearest_mode}
    check("Resize", attrs, [SMALL, f32(), f32(1, 1, *scales)], tile, opset=13)


@pytest.mark.parametrize("out_tile", [None, "double"])
@pytest.mark.parametrize("tile", TILES)
def test_resize_yolox_style(tile, out_tile):
    # Opset 11, roi and scales given; with doubled output tiles the repeat fast path runs.
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    out_tiles = [2 * tile] if out_tile else None
    check("Resize", attrs, [SMALL, f32(), f32(1, 1, 2, 2)], tile, opset=11, out_tiles=out_tiles)


@pytest.mark.parametrize("tile", [1, 4])
def test_resize_sizes_and_older_forms(tile):
    sizes = i64(1, 3, 14, 5)
    check("Resize", {"mode": "nearest"}, [SMALL, None, None, sizes], tile, opset=13)
    check("Resize", {"mode": "nearest"}, [SMALL, f32(), f32(), sizes], tile, opset=11)
    check("Resize", {"mode": "nearest"}, [SMALL, f32(1, 1, 2, 3)], tile, opset=10)
    check("Upsample", {"mode": "nearest"}, [SMALL, f32(1, 1, 2, 3)], tile, opset=9)


def test_resize_reasons():
    resize = get_operator("Resize")
    spec = make_spec("Resize", {"mode": "linear"}, [SMALL, f32(), f32(1, 1, 2, 2)], [(1, 3, 14, 18)], 4, opset=13)
    assert "nearest only" in resize.supports(spec)
    spec = make_spec("Resize", {"mode": "nearest"}, [SMALL, f32(), f32(1, 2, 2, 2)], [(1, 6, 14, 18)], 4, opset=13)
    assert "channel axis" in resize.supports(spec)


# -- Softmax ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", TILES)
def test_softmax_channels(tile):
    check("Softmax", {"axis": 1}, [SMALL], tile, opset=13)


def test_softmax_reasons():
    softmax = get_operator("Softmax")
    assert "opset 13" in softmax.supports(make_spec("Softmax", {"axis": 1}, [SMALL], [SMALL], 4, opset=11))
    assert "axis -1" in softmax.supports(make_spec("Softmax", {"axis": -1}, [SMALL], [SMALL], 4, opset=13))


# -- Registry --------------------------------------------------------------------------------

def test_unknown_op_type_lists_registered_ones():
    with pytest.raises(UnsupportedOperator) as error:
        get_operator("LRN")
    message = str(error.value)
    assert "LRN" in message
    for op_type in ("Conv", "MaxPool", "Concat", "Resize", "Mul", "Slice"):
        assert op_type in registered_op_types()
        assert op_type in message


# -- Both recompute paths of the windowed operators -------------------------------------------

@pytest.fixture(params=["patches", "whole-buffer"])
def recompute_path(request, monkeypatch):
    """Force the windowed operators to gather patches, or to recompute the whole buffer."""
    from deluceva.operators.conv import DeltaConv
    from deluceva.operators.pool import DeltaPool

    threshold = 10**9 if request.param == "patches" else -1
    for cls in (DeltaConv, DeltaPool):
        original = cls.__init__

        def init(self, spec, original=original):
            original(self, spec)
            self.dense_from = threshold

        monkeypatch.setattr(cls, "__init__", init)
    return request.param


@pytest.mark.parametrize("tile", [1, 4])
def test_windowed_ops_on_both_paths(recompute_path, tile):
    weight = rng.standard_normal((3, 4, 3, 3)).astype(np.float32)
    check("Conv", {"strides": [2, 2], "pads": [1, 0, 1, 2]}, [(1, 4, 13, 11), weight], tile)
    check("Conv", {"group": 4, "dilations": [2, 2], "auto_pad": "VALID"},
          [(1, 4, 13, 11), rng.standard_normal((4, 1, 3, 3)).astype(np.float32)], tile)
    check("MaxPool", POOLS["3x3s2-pad-ceil"], [(1, 3, 11, 13)], tile)
    check("MaxPool", POOLS["spp13"], [(1, 3, 11, 13)], tile)
    check("AveragePool", {**POOLS["asym-ceil"], "count_include_pad": 0}, [(1, 3, 11, 13)], tile)


# -- Layout: SpaceToDepth, channel Gather -----------------------------------------------------

@pytest.mark.parametrize("block", [2, 4])
@pytest.mark.parametrize("tile", [4, 8])
def test_space_to_depth(tile, block):
    check("SpaceToDepth", {"blocksize": block}, [(1, 3, 16, 24)], tile, out_tiles=[tile // block])


@pytest.mark.parametrize("tile", TILES)
def test_gather_channels(tile):
    check("Gather", {"axis": 1}, [CHANNELS, i64(3, 0, -1, 1, 1)], tile)


def test_layout_reasons():
    spec = make_spec("SpaceToDepth", {"blocksize": 2}, [(1, 3, 16, 24)], [(1, 12, 8, 12)], 4, out_tiles=[4])
    assert "line up" in get_operator("SpaceToDepth").supports(spec)
    spec = make_spec("Gather", {"axis": 2}, [CHANNELS, i64(0, 1)], [(1, 4, 2, 13)], 4)
    assert "channel axis" in get_operator("Gather").supports(spec)
