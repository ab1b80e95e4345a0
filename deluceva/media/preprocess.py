"""From an RGB uint8 video frame to a model input: resize, letterbox or pad, channels, scale, layout.

A generic form for any model; the detector families' own settings are in `deluceva.presets`. Resizing uses FFmpeg's swscale through PyAV (bilinear), about 10x faster than numpy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import av
import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["Preprocessor", "resize"]

MODES = ("none", "resize", "letterbox", "pad")
CHANNELS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an RGB uint8 (H, W, 3) image with swscale; returns uint8 (height, width, 3)."""
    if image.shape[:2] == (height, width):
        return image
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    return frame.reformat(width=width, height=height, interpolation="BILINEAR").to_ndarray()


@dataclass(frozen=True)
class Preprocessor:
    """How a frame becomes a model input; `__call__(rgb_frame) -> (1, C, H, W) float32`.

    Frozen, so that a preset's shared one cannot be changed by accident; use `replace`.

    Attributes:
        mode: "none" (frame size as is), "resize" (to `size`, aspect ignored), "letterbox" (scale
            to fit `size` keeping the aspect, image top-left as in YOLOX, rest `pad_value`), "pad"
            (zero-pad right/bottom to a multiple of `multiple`, or to `size` when it is given).
        size: (H, W) target for resize/letterbox (and an exact target for pad); None otherwise.
        multiple: the pad multiple (mode "pad" without `size`).
        pad_value: fill for letterbox and pad, in 0..255 pixel units (before scale/mean/std).
        channels: "RGB", "BGR" or "GRAY" (ITU-R 601 luma, one channel).
        scale, mean, std: input = (pixel * scale - mean) / std, per channel for mean/std.
        layout: "NCHW" or "NHWC".
        name: the preset's name, or "generic".

    Example:
        >>> pre = Preprocessor(mode="letterbox", size=(416, 416), channels="BGR")
        >>> pre.input_shape((480, 640))
        (1, 3, 416, 416)
    """

    mode: str = "none"
    size: tuple[int, int] | None = None
    multiple: int = 32
    pad_value: float = 0.0
    channels: str = "RGB"
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "NCHW"
    name: str = "generic"
    _affine: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DelucevaError(f"resize mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.channels not in CHANNELS:
            raise DelucevaError(f"channel order {self.channels!r} is not one of {', '.join(CHANNELS)}")
        if self.layout not in LAYOUTS:
            raise DelucevaError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(s) for s in self.size))
            if len(self.size) != 2 or min(self.size) < 1:
                raise DelucevaError(f"size must be (height, width) of positive integers, got {self.size}")
        if self.mode in ("resize", "letterbox") and self.size is None:
            raise DelucevaError(f"resize mode {self.mode!r} needs a size (height, width)")
        if self.multiple < 1:
            raise DelucevaError(f"pad multiple must be at least 1, got {self.multiple}")
        c = self.num_channels
        mean = np.broadcast_to(np.asarray(self.mean, np.float32).ravel(), (c,)) if len(self.mean) in (1, c) else None
        std = np.broadcast_to(np.asarray(self.std, np.float32).ravel(), (c,)) if len(self.std) in (1, c) else None
        if mean is None or std is None:
            raise DelucevaError(f"mean and std need 1 or {c} values, got {self.mean} and {self.std}")
        if not np.all(std != 0) or not self.scale:
            raise DelucevaError("std values and scale must be non-zero")
        # One multiply-add per pixel: (x * scale - mean) / std == x * a + b.
        object.__setattr__(self, "_affine", ((self.scale / std).astype(np.float32), (-mean / std).astype(np.float32)))

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "GRAY" else 3

    def replace(self, **changes) -> Preprocessor:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # -- geometry --------------------------------------------------------------------------

    def geometry(self, frame_hw: tuple[int, int]) -> tuple[float, float, int, int, int, int]:
        """(scale_y, scale_x, content_h, content_w, input_h, input_w) for a frame of `frame_hw`.

        The frame's content, resized to content_h x content_w, sits at the input's top-left;
        the rest is padding. Divide input coordinates by (scale_x, scale_y) to get frame ones.
        """
        h, w = (int(v) for v in frame_hw)
        if h < 1 or w < 1:
            raise DelucevaError(f"frame size {w}x{h} is empty")
        if self.mode == "resize":
            H, W = self.size
            return H / h, W / w, H, W, H, W
        if self.mode == "letterbox":
            H, W = self.size
            r = min(H / h, W / w)
            # int() truncation as in YOLOX's preproc, so its trained behaviour is reproduced.
            ch, cw = max(1, int(h * r)), max(1, int(w * r))
            return r, r, ch, cw, H, W
        if self.mode == "pad":
            if self.size is not None:
                H, W = self.size
                if h > H or w > W:
                    raise DelucevaError(f"frame {w}x{h} is larger than the model input {W}x{H} it is padded to")
            else:
                m = self.multiple
                H, W = -(-h // m) * m, -(-w // m) * m
            return 1.0, 1.0, h, w, H, W
        return 1.0, 1.0, h, w, h, w

    def to_frame(self, boxes: np.ndarray, frame_hw: tuple[int, int]) -> np.ndarray:
        """Boxes (n, 4) as x1, y1, x2, y2 in model-input pixels, mapped to the pixels of a frame
        of `frame_hw` (the resize or letterbox undone, the padding dropped), clipped to the frame.

        Example:
            >>> pre = Preprocessor(mode="letterbox", size=(416, 416))
            >>> pre.to_frame(np.array([[0.0, 0.0, 208.0, 104.0]]), (480, 640)).tolist()
            [[0.0, 0.0, 320.0, 160.0]]
        """
        scale_y, scale_x, *_ = self.geometry(frame_hw)
        h, w = (int(v) for v in frame_hw)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / np.array([scale_x, scale_y, scale_x, scale_y])
        return np.clip(boxes, 0.0, np.array([w, h, w, h], np.float64))

    def input_shape(self, frame_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """The model input shape for frames of `frame_hw` = (height, width), in `layout`."""
        *_, H, W = self.geometry(frame_hw)
        c = self.num_channels
        return (1, c, H, W) if self.layout == "NCHW" else (1, H, W, c)

    # -- conversion ------------------------------------------------------------------------

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        """One RGB uint8 (H, W, 3) frame as a float32 model input of `input_shape`."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise DelucevaError(f"expected an RGB frame (H, W, 3), got shape {frame.shape}")
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        _, _, ch, cw, H, W = self.geometry(frame.shape[:2])
        content = resize(frame, ch, cw)
        if self.channels == "BGR":
            content = content[:, :, ::-1]
        elif self.channels == "GRAY":
            content = content.astype(np.float32) @ np.array([[0.299], [0.587], [0.114]], np.float32)
        a, b = self._affine
        c = self.num_channels
        pad = np.float32(self.pad_value) * a + b  # the padding after the same affine map
        if self.layout == "NCHW":
            out = np.empty((1, c, H, W), np.float32)
            out[0] = pad[:, None, None]
            view = out[0, :, :ch, :cw]
            np.copyto(view, np.moveaxis(content, 2, 0), casting="unsafe")
            view *= a[:, None, None]
            view += b[:, None, None]
        else:
            out = np.empty((1, H, W, c), np.float32)
            out[0] = pad
            view = out[0, :ch, :cw]
            np.copyto(view, content, casting="unsafe")
            view *= a
            view += b
        return out

    # -- fitting a model -------------------------------------------------------------------

    @classmethod
    def for_model(cls, model_input_shape, preset: Preprocessor | None = None, model_name: str = "model",
                  **generic) -> Preprocessor:
        """The preprocessor for a model input of `model_input_shape`, checked against it.

        Args:
            model_input_shape: the model's input shape; dynamic dims may be None, strings or <= 0.
                A `deluceva.Model` is accepted too (its input_shape and path are used).
            preset: a preset's Preprocessor (`deluceva.presets.preprocessing(name)`); None for the
                generic form.
            model_name: how the model is called in error messages (e.g. its file name).
            **generic: fields of `Preprocessor` overriding the preset's or the generic defaults.
                Without a preset: a model with a fixed H x W gets mode "resize" to it; a dynamic
                one gets mode "pad": frames zero-padded right and bottom to a multiple of 32
                (detectors with strided heads need it; at the frame's own size a 720-row frame
                breaks a stride-32 feature pyramid).

        Raises:
            DelucevaError: "preset yolox does not fit MODEL: ..." when the channels, layout or a
                fixed size disagree; bad field values.
        """
        if hasattr(model_input_shape, "input_shape"):
            model_name = getattr(model_input_shape, "path", model_name)
            model_input_shape = model_input_shape.input_shape
        dims = [d if isinstance(d, (int, np.integer)) and d > 0 else None for d in model_input_shape]
        if len(dims) != 4:
            raise DelucevaError(f"{model_name}: input has shape {tuple(model_input_shape)}; expected 4 dims (1, C, H, W)")
        label = preset.name if preset is not None else None
        if preset is None:
            layout = generic.get("layout", "NCHW")
            c, h, w = (dims[1], dims[2], dims[3]) if layout == "NCHW" else (dims[3], dims[1], dims[2])
            defaults: dict = {"layout": layout}
            if c == 1:
                defaults["channels"] = "GRAY"
            if h is not None and w is not None:
                defaults.update(mode="resize", size=(h, w))
            elif h is None and w is None:
                defaults.update(mode="pad", multiple=32)
            pre = cls(**{**defaults, **generic})
        else:
            pre = preset.replace(**generic) if generic else preset
        c, h, w = (dims[1], dims[2], dims[3]) if pre.layout == "NCHW" else (dims[3], dims[1], dims[2])
        problems = []
        if c is not None and c != pre.num_channels:
            problems.append(f"model input has {c} channels, preset gives {pre.num_channels} ({pre.channels})")
        fixed = (h, w) if h is not None and w is not None else None
        if fixed:
            if pre.mode in ("resize", "letterbox") and pre.size != fixed:
                problems.append(f"model input is {fixed[1]}x{fixed[0]} (WxH), preset makes {pre.size[1]}x{pre.size[0]}")
            elif pre.mode == "pad":
                if pre.size is None and (h % pre.multiple or w % pre.multiple):
                    problems.append(f"model input {w}x{h} is not a multiple of {pre.multiple}")
                elif pre.size not in (None, fixed):
                    problems.append(f"model input is {w}x{h}, preset pads to {pre.size[1]}x{pre.size[0]}")
                else:
                    pre = pre.replace(size=fixed)  # pad every frame to the model's one size
            elif pre.mode == "none":
                pass  # frame must already be that size; checked per frame by the caller's model
        if problems:
            who = f"preset {label}" if label else "preprocessing"
            raise DelucevaError(f"{who} does not fit {model_name}: " + "; ".join(problems))
        return pre
