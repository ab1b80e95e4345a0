"""Preprocessing: letterbox/pad geometry, channel order and normalisation, presets against models."""

from __future__ import annotations

import numpy as np
import pytest

from deluceva.errors import DelucevaError
from deluceva.media.preprocess import Preprocessor, resize
from deluceva.presets import preprocessing


def _frame(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("hw,content", [((480, 640), (312, 416)), ((720, 1280), (234, 416)), ((640, 320), (416, 208))])
def test_letterbox_geometry(hw, content):
    pre = preprocessing("yolox")
    frame = np.full((*hw, 3), (10, 20, 30), np.uint8)  # R, G, B
    x = pre(frame)
    assert x.shape == pre.input_shape(hw) == (1, 3, 416, 416) and x.dtype == np.float32
    ch, cw = content
    # Content at the top-left, BGR order, unnormalised; the rest is 114.
    assert np.allclose(x[0, :, :ch, :cw], np.array([30, 20, 10], np.float32)[:, None, None])
    pad = np.ones((416, 416), bool)
    pad[:ch, :cw] = False
    assert np.all(x[0][:, pad] == 114)
    sy, sx, *_ = pre.geometry(hw)
    assert sy == sx == pytest.approx(min(416 / hw[0], 416 / hw[1]))


def test_letterbox_keeps_image_content():
    # A bright square keeps its place after scaling by the letterbox ratio.
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[100:200, 320:420] = 255
    x = preprocessing("yolox")(frame)[0, 0]
    r = 416 / 640
    rows = np.flatnonzero(x[:, int(370 * r)] > 128)
    cols = np.flatnonzero(x[int(150 * r)] > 128)
    assert abs(rows[0] - 100 * r) <= 1.5 and abs(rows[-1] - 200 * r) <= 1.5
    assert abs(cols[0] - 320 * r) <= 1.5 and abs(cols[-1] - 420 * r) <= 1.5


def test_yunet_pads_right_bottom_to_multiple_of_32():
    pre = preprocessing("yunet")
    frame = _frame(100, 170)
    x = pre(frame)
    assert x.shape == pre.input_shape((100, 170)) == (1, 3, 128, 192)
    assert np.array_equal(x[0, :, :100, :170], frame[:, :, ::-1].transpose(2, 0, 1).astype(np.float32))
    assert not x[0, :, 100:].any() and not x[0, :, :, 170:].any()
    assert preprocessing("yunet").input_shape((128, 192)) == (1, 3, 128, 192)


def test_mtcnn_normalisation_any_size():
    pre = preprocessing("mtcnn")
    frame = _frame(37, 53)
    x = pre(frame)
    assert x.shape == (1, 3, 37, 53)
    want = (frame.transpose(2, 0, 1).astype(np.float32) - 127.5) / 128
    assert np.allclose(x[0], want, atol=1e-6)


def test_generic_resize_mean_std_and_nhwc():
    pre = Preprocessor(mode="resize", size=(24, 32), scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5),
                       layout="NHWC")
    frame = np.full((48, 64, 3), 200, np.uint8)
    x = pre(frame)
    assert x.shape == pre.input_shape((48, 64)) == (1, 24, 32, 3)
    assert np.allclose(x[0, 5, 7], (200 / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5]), atol=1e-5)


def test_gray_channel():
    pre = Preprocessor(channels="GRAY")
    frame = np.zeros((8, 8, 3), np.uint8)
    frame[..., 1] = 100
    x = pre(frame)
    assert x.shape == (1, 1, 8, 8) and np.allclose(x, 58.7, atol=1e-3)


def test_resize_is_bilinear_and_keeps_flat_images():
    flat = np.full((50, 70, 3), 77, np.uint8)
    assert np.all(resize(flat, 31, 43) == 77)
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 64)[None, :, None], 8, 0), 3, 2).astype(np.uint8)
    out = resize(ramp, 8, 32)[4, :, 0].astype(int)
    assert np.all(np.diff(out) >= 0) and out[0] < 20 and out[-1] > 235


def test_for_model_checks_presets():
    assert Preprocessor.for_model((1, 3, 416, 416), preprocessing("yolox")) == preprocessing("yolox")
    with pytest.raises(DelucevaError, match=r"preset yolox does not fit m\.onnx: model input is 320x320"):
        Preprocessor.for_model((1, 3, 320, 320), preprocessing("yolox"), model_name="m.onnx")
    with pytest.raises(DelucevaError, match="preset yolox does not fit m.onnx: model input has 1 channels"):
        Preprocessor.for_model((1, 1, 416, 416), preprocessing("yolox"), model_name="m.onnx")
    with pytest.raises(DelucevaError, match="preset yunet does not fit m.onnx: .* not a multiple of 32"):
        Preprocessor.for_model((1, 3, 720, 1270), preprocessing("yunet"), model_name="m.onnx")
    with pytest.raises(DelucevaError, match="preset mtcnn does not fit"):
        Preprocessor.for_model((1, 4, None, None), preprocessing("mtcnn"))
    # A dynamic model takes the preset as is; a fixed YuNet pads every frame to its one size.
    assert Preprocessor.for_model((1, 3, "height", "width"), preprocessing("yunet")) == preprocessing("yunet")
    fixed = Preprocessor.for_model((1, 3, 736, 1280), preprocessing("yunet"))
    assert fixed.input_shape((720, 1280)) == (1, 3, 736, 1280)
    with pytest.raises(DelucevaError, match="larger than the model input"):
        fixed.input_shape((1080, 1920))


def test_for_model_generic_and_unknown_preset():
    pre = Preprocessor.for_model((1, 3, 224, 224), scale=1 / 255)
    assert (pre.mode, pre.size, pre.input_shape((480, 640))) == ("resize", (224, 224), (1, 3, 224, 224))
    assert Preprocessor.for_model((1, 1, None, None)).channels == "GRAY"
    with pytest.raises(DelucevaError, match="unknown preset 'yolo'; known presets: mtcnn, yolox, yunet"):
        preprocessing("yolo")


@pytest.mark.parametrize("kwargs,word", [
    (dict(mode="stretch"), "resize mode"), (dict(channels="RGBA"), "channel order"),
    (dict(layout="CHW"), "layout"), (dict(mode="resize"), "needs a size"),
    (dict(std=(1.0, 0.0, 1.0)), "non-zero"), (dict(mean=(1.0, 2.0)), "mean and std"),
    (dict(mode="pad", multiple=0), "multiple"),
])
def test_bad_fields(kwargs, word):
    with pytest.raises(DelucevaError, match=word):
        Preprocessor(**kwargs)


def test_bad_frame():
    with pytest.raises(DelucevaError, match="RGB frame"):
        preprocessing("yolox")(np.zeros((10, 10), np.uint8))


def test_presets_fit_the_shared_models(shared_data):
    from deluceva.planner import load_model

    for name, preset in [("yolox_nano_coco_416", "yolox"), ("mtcnn_pnet_dynamic", "mtcnn")]:
        import onnx

        proto = onnx.load(str(shared_data / "models" / f"{name}.onnx"), load_external_data=False)
        dims = [d.dim_value or None for d in proto.graph.input[0].type.tensor_type.shape.dim]
        assert Preprocessor.for_model(dims, preprocessing(preset)).name == preset
    model = load_model(shared_data / "models" / "yolox_nano_coco_416.onnx")
    with pytest.raises(DelucevaError, match="preset mtcnn does not fit"):
        Preprocessor.for_model((1, 1, 416, 416), preprocessing("mtcnn"), model_name=model.path)
    assert Preprocessor.for_model(model, preprocessing("yolox")).input_shape((480, 640)) == model.input_shape


@pytest.mark.parametrize("pre, frame_hw", [
    (preprocessing("yolox"), (480, 640)),                                    # letterbox, top-left
    (preprocessing("yolox"), (720, 400)),                                    # letterbox of a tall frame
    (Preprocessor(mode="resize", size=(96, 160)), (240, 320)),               # aspect changed
    (preprocessing("yunet"), (200, 300)),                                    # padded right and bottom
    (preprocessing("mtcnn"), (120, 200)),                                    # as is
])
def test_to_frame_maps_a_box_in_the_input_back_to_the_pixels_it_covers(pre, frame_hw):
    """A white rectangle drawn in the frame, found in the model input and mapped back with
    `to_frame`, lands where it was drawn (within the one pixel that resizing blurs)."""
    h, w = frame_hw
    x1, y1, x2, y2 = int(w * 0.3), int(h * 0.4), int(w * 0.7), int(h * 0.9)
    frame = np.zeros((h, w, 3), np.uint8)
    frame[y1:y2, x1:x2] = 255
    tensor = pre(frame)[0].mean(axis=0)
    _, _, ch, cw, _, _ = pre.geometry(frame_hw)
    bright = tensor[:ch, :cw] > (tensor[:ch, :cw].min() + tensor[:ch, :cw].max()) / 2
    rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
    found = np.array([[cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]], np.float64)
    back = pre.to_frame(found, frame_hw)[0]
    scale_y, scale_x, *_ = pre.geometry(frame_hw)
    tolerance = 1.5 / min(scale_x, scale_y)  # one input pixel, in frame pixels
    np.testing.assert_allclose(back, [x1, y1, x2, y2], atol=tolerance)


def test_to_frame_clips_to_the_frame():
    pre = preprocessing("yunet")  # pads 200x300 to 224x320: boxes may reach into the padding
    assert pre.to_frame(np.array([[-5.0, 190.0, 310.0, 220.0]]), (200, 300)).tolist() == [[0.0, 190.0, 300.0, 200.0]]
