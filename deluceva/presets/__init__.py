"""Presets: what deluceva knows about a detector family, one module each.

Each module (`yolox`, `yunet`, `mtcnn`) holds the family's `PREPROCESSING` (a `Preprocessor`:
how a decoded RGB frame becomes the model's input) and its decoder (`decoder(input_shape,
output_names)`: raw head outputs to `Detections` in model-input pixels), which the `det` metric
compares. A detector without a preset whose outputs are already boxes and scores is decoded by
`generic` (`DetectorOptions`: `run --boxes B --scores S`), which overrides a preset's decoder.

Example:
    >>> get_preset("yolox").PREPROCESSING.size
    (416, 416)
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.presets import mtcnn, yolox, yunet
from deluceva.presets.detections import Detections
from deluceva.presets.generic import DetectorOptions, generic_decoder

__all__ = ["PRESETS", "get_preset", "preprocessing", "get_decoder", "check_preset", "decodes_detections", "class_names",
           "Detections", "DetectorOptions"]

PRESETS: dict[str, ModuleType] = {"yolox": yolox, "yunet": yunet, "mtcnn": mtcnn}


def get_preset(name: str) -> ModuleType:
    """The preset module called `name`; DelucevaError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DelucevaError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


def preprocessing(preset):
    """A preset's `Preprocessor`: `preset` is a name, a Preprocessor (returned as is) or None."""
    if preset is None or not isinstance(preset, str):
        return preset
    return get_preset(preset).PREPROCESSING


def decodes_detections(preset, detector: DetectorOptions | None = None) -> bool:
    """Whether a run with this preset and generic det options can decode detections."""
    return detector is not None or getattr(preset, "name", preset) in PRESETS


def get_decoder(preset, input_shape: Sequence[int] | None = None, output_names: Sequence[str] | None = None,
                detector: DetectorOptions | None = None):
    """The detection decoder for a preset (name or Preprocessor), or for the generic det options
    `detector` where given (they override the preset's), bound to the model's input shape
    (1, C, H, W) and output names where the decoder uses them; DelucevaError if it has none."""
    if detector is not None:
        return generic_decoder(detector, input_shape, output_names)
    name = getattr(preset, "name", preset)
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise DelucevaError(f"metric det needs a preset that decodes detections ({known}) or the model's boxes and "
                            f"scores outputs (--boxes B --scores S, or --head yolov8); got {name or 'no preset'}")
    return PRESETS[name].decoder(input_shape, output_names)


def class_names(preset, detector: DetectorOptions | None = None):
    """The class names a preset's decoder numbers its classes by; None for generic detections."""
    name = getattr(preset, "name", preset)
    return None if detector is not None or name not in PRESETS else getattr(PRESETS[name], "CLASS_NAMES", None)


def check_preset(preset, model, detector: DetectorOptions | None = None) -> None:
    """Refuse a preset (or generic det options) whose detection decoder does not fit `model`'s
    outputs and input: the decoder runs once on outputs of the model's shapes (zeros, and ones
    so that every anchor is placed). Presets without a decoder fit any model their
    preprocessing fits."""
    name = getattr(preset, "name", preset)
    if detector is not None:
        _check_generic(detector, model)
        return
    if name not in PRESETS:
        return
    decoder = get_decoder(name, model.input_shape, model.output_names)
    shapes = [model.shapes.get(o) for o in model.output_names]
    if any(shape is None for shape in shapes):
        return  # shapes not inferred: the first reference frame will tell
    try:
        for fill in (0.0, 1.0):
            decoder([np.full(shape, fill, np.float32) for shape in shapes])
    except DelucevaError as error:
        raise DelucevaError(f"{model.path}: preset {name} does not fit this model ({error})") from None


def _check_generic(detector: DetectorOptions, model) -> None:
    """Refuse generic det options naming an output the model lacks, or one of the wrong shape."""
    names = [detector.boxes] if detector.head else [detector.boxes, detector.scores]
    for flag, name in zip(("--head yolov8" if detector.head else "--boxes", "--scores"), names):
        if name is not None and name not in model.output_names:
            raise DelucevaError(f"{model.path}: {flag} {name}: no such output; the model's outputs are "
                                f"{', '.join(model.output_names)}")
    shapes = {o: model.shapes.get(o) for o in model.output_names}
    if any(shape is None for shape in shapes.values()):
        return  # shapes not inferred: the first reference frame will tell
    decoder = generic_decoder(detector, model.input_shape, model.output_names)
    try:
        decoder({o: np.zeros(shape, np.float32) for o, shape in shapes.items()})
    except DelucevaError as error:
        raise DelucevaError(f"{model.path}: {error}") from None
