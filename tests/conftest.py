"""Shared test fixtures: where the real models and videos are, and reading frames from them.

The data folder (`../shared/data` beside the checkout) is optional: tests that need it skip
with a reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    if not (SHARED_DATA / "models").is_dir() or not (SHARED_DATA / "videos").is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def read_frames(path: Path | str, count: int) -> list[np.ndarray]:
    """The first `count` frames of a video as RGB uint8 arrays (H, W, 3), decoded with PyAV."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == count:
                break
    return frames


def preprocessor(preset: str, size: tuple[int, int] | None = None):
    """The `deluceva.media.preprocess` preset, optionally at a reduced input `size` (H, W).

    A reduced size keeps each preset's channel order and scaling: YOLOX letterboxes to it (its
    own mode), YuNet is letterboxed with zero padding (scaled to fit, padded right/bottom),
    MTCNN is resized to it.
    """
    from deluceva.presets import preprocessing

    pre = preprocessing(preset)
    if size is None:
        return pre
    mode = {"yolox": "letterbox", "yunet": "letterbox", "mtcnn": "resize"}[preset]
    return pre.replace(mode=mode, size=tuple(size))


def video_inputs(shared: Path, video: str, count: int, preset: str, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first `count` frames of `videos/<video>` as model inputs (1, 3, H, W) for `preset`."""
    pre = preprocessor(preset, size)
    return [pre(frame) for frame in read_frames(shared / "videos" / video, count)]


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want||: the rel-l2 metric's, for one array."""
    from deluceva.metrics import rel_l2

    return rel_l2([got], [want])
