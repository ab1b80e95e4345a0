"""The video with each frame's detections drawn, written as the run goes (`run --annotate OUT.mp4`).

Boxes, and a label with the class and score, are drawn with numpy (a built-in 5x7 bitmap font:
no imaging library at run time) and encoded with PyAV: H.264 (libx264, or MPEG-4 where this
PyAV lacks it) with a keyframe every second, in a fragmented MP4 (a fragment per keyframe), so
a run killed without a chance to close the file still leaves a playable video of all but its
last second; a run stopped by Ctrl-C or an error closes it whole.

Example:
    >>> writer = AnnotationWriter("out.mp4", decoder, preprocess, (480, 640), fps=30)  # doctest: +SKIP
    >>> writer.add(rgb, outputs); writer.close()                                      # doctest: +SKIP
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["AnnotationWriter", "draw_detections", "draw_text", "FONT", "ANNOTATION_SUFFIXES"]

ANNOTATION_SUFFIXES = (".mp4", ".mkv", ".mov")

# 5x7 glyphs, one string of 7 rows of 5 bits each ("#" on). Upper case only: labels are upper-cased.
_GLYPHS = {
    "0": ".###.#...##..###.#.###..##...#.###.", "1": "..#...##....#....#....#....#...###.",
    "2": ".###.#...#....#...#...#...#...#####", "3": "#####...#...#.....#.....##...#.###.",
    "4": "...#...##..#.#.#..#.#####...#....#.", "5": "######....####.....#....##...#.###.",
    "6": "..##..#...#....####.#...##...#.###.", "7": "#####....#...#...#...#....#....#...",
    "8": ".###.#...##...#.###.#...##...#.###.", "9": ".###.#...##...#.####....#...#..##..",
    "A": ".###.#...##...#######...##...##...#", "B": "####.#...##...#####.#...##...#####.",
    "C": ".###.#...##....#....#....#...#.###.", "D": "###..#..#.#...##...##...##..#.###..",
    "E": "######....#....####.#....#....#####", "F": "######....#....####.#....#....#....",
    "G": ".###.#...##....#.####...##...#.####", "H": "#...##...##...#######...##...##...#",
    "I": ".###...#....#....#....#....#...###.", "J": "..###...#....#....#....#.#..#..##..",
    "K": "#...##..#.#.#..##...#.#..#..#.#...#", "L": "#....#....#....#....#....#....#####",
    "M": "#...###.###.#.##.#.##...##...##...#", "N": "#...##...###..##.#.##..###...##...#",
    "O": ".###.#...##...##...##...##...#.###.", "P": "####.#...##...#####.#....#....#....",
    "Q": ".###.#...##...##...##.#.##..#..##.#", "R": "####.#...##...#####.#.#..#..#.#...#",
    "S": ".#####....#.....###.....#....#####.", "T": "#####..#....#....#....#....#....#..",
    "U": "#...##...##...##...##...##...#.###.", "V": "#...##...##...##...##...#.#.#...#..",
    "W": "#...##...##...##.#.##.#.##.#.#.#.#.", "X": "#...##...#.#.#...#...#.#.#...##...#",
    "Y": "#...##...#.#.#...#....#....#....#..", "Z": "#####....#...#...#...#...#....#####",
    ".": "..........................##...##..", "-": "................###................",
    ":": "......##...##........##...##.......", "%": "##...##..#...#...#...#...#..##...##",
    " ": "...................................", "_": "..............................#####",
    "/": ".........#...#...#...#...#.........", "?": ".###.#...#....#...#...#.........#..",
}
FONT = {c: np.array([[g[r * 5 + k] == "#" for k in range(5)] for r in range(7)]) for c, g in _GLYPHS.items()}

# Distinct colours per class (RGB), cycled.
_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190],
                     [0, 128, 128], [170, 110, 40]], np.uint8)


def draw_text(image: np.ndarray, text: str, x: int, y: int, color, scale: int = 1) -> None:
    """Write `text` (upper-cased; unknown characters as "?") into RGB `image` in place, its top
    left corner at (x, y), each glyph 5x7 pixels times `scale`, clipped at the image's edges."""
    h, w = image.shape[:2]
    for i, char in enumerate(text.upper()):
        glyph = FONT.get(char, FONT["?"])
        if scale > 1:
            glyph = np.kron(glyph, np.ones((scale, scale), bool))
        gx, gy = x + i * 6 * scale, y
        x0, y0, x1, y1 = max(gx, 0), max(gy, 0), min(gx + glyph.shape[1], w), min(gy + glyph.shape[0], h)
        if x0 >= x1 or y0 >= y1:
            continue
        region = image[y0:y1, x0:x1]
        region[glyph[y0 - gy:y1 - gy, x0 - gx:x1 - gx]] = color


def draw_detections(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                    names=None) -> np.ndarray:
    """RGB `image` with each box outlined and labelled "CLASS SCORE" above it (in place; returned).

    Args:
        boxes: (n, 4) x1, y1, x2, y2 in the image's pixels.
        names: class names by index (a preset's), or None to label with the class number.
    """
    h, w = image.shape[:2]
    scale = max(1, min(h, w) // 360)  # legible on 1080p, still small on QCIF
    thick = 2 * scale  # 2 pixels at least: a 1-pixel line smears in 4:2:0 video
    for box, score, cls in zip(np.asarray(boxes, np.float64).reshape(-1, 4), scores, classes):
        color = _PALETTE[int(cls) % len(_PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        x1, x2 = sorted((min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)))
        y1, y2 = sorted((min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)))
        image[y1:y1 + thick, x1:x2 + 1] = color
        image[max(y2 - thick + 1, 0):y2 + 1, x1:x2 + 1] = color
        image[y1:y2 + 1, x1:x1 + thick] = color
        image[y1:y2 + 1, max(x2 - thick + 1, 0):x2 + 1] = color
        name = names[int(cls)] if names is not None and 0 <= int(cls) < len(names) else str(int(cls))
        label = f"{name} {float(score):.2f}"
        lh, lw = 9 * scale, len(label) * 6 * scale + scale
        ly = y1 - lh if y1 - lh >= 0 else min(y1 + thick, h - 1)  # above the box, or inside at the top
        image[ly:ly + lh, x1:min(x1 + lw, w)] = color
        ink = (0, 0, 0) if int(color.astype(int) @ np.array([299, 587, 114])) > 140_000 else (255, 255, 255)
        draw_text(image, label, x1 + scale, ly + scale, ink, scale)
    return image


class AnnotationWriter:
    """Writes each frame with its detections drawn into a video file, as the run goes.

    `decoder` turns the model's outputs into detections in model-input pixels (a preset's or the
    generic one, see `deluceva.presets`); `preprocess.to_frame` maps them to the frame's pixels.
    The frame size is cut to even numbers (yuv420p) where it is odd.

    With `resume`, the frames a stopped run left in `path` (at most `frames`) are copied into the
    new file first, so a resumed stream still ends with one video; a file cut short by a kill
    keeps only its whole fragments.
    """

    def __init__(self, path: str | os.PathLike, decoder, preprocess, frame_hw: tuple[int, int], fps: float = 0.0,
                 names=None, resume: bool = False, frames: int = 0):
        self.path = Path(path)
        if self.path.suffix.lower() not in ANNOTATION_SUFFIXES:
            raise DelucevaError(f"{self.path}: --annotate needs a video file ending in {', '.join(ANNOTATION_SUFFIXES)}")
        if not self.path.parent.is_dir():
            raise DelucevaError(f"{self.path}: folder {self.path.parent} does not exist")
        self.decoder, self.preprocess, self.names = decoder, preprocess, names
        self.frame_hw = tuple(int(v) for v in frame_hw)
        self.size = (self.frame_hw[0] - self.frame_hw[0] % 2, self.frame_hw[1] - self.frame_hw[1] % 2)
        if min(self.size) < 2:
            raise DelucevaError(f"{self.path}: frames of {self.frame_hw[1]}x{self.frame_hw[0]} are too small to encode")
        self.rate = Fraction(fps).limit_denominator(1001) if fps and fps > 0 else Fraction(25)
        self.frames = 0
        previous = None
        if resume and frames and self.path.is_file():
            previous = self.path.with_name(self.path.name + ".previous")
            os.replace(self.path, previous)
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        # flush_packets: each fragment reaches the file as it is made, not when a 32 KB buffer fills.
        options = {"flush_packets": "1"}
        if self.path.suffix.lower() != ".mkv":
            options["movflags"] = "frag_keyframe+empty_moov+default_base_moof"
        try:
            self.container = av.open(str(self.path), mode="w", options=options)
        except (OSError, av.error.FFmpegError) as error:
            raise DelucevaError(f"{self.path}: cannot write it ({error})") from None
        self.stream = self.container.add_stream(codec, rate=self.rate)
        self.stream.width, self.stream.height = self.size[1], self.size[0]
        self.stream.pix_fmt = "yuv420p"
        # A keyframe (and so an MP4 fragment) every second; zerolatency: no frames held back.
        self.stream.codec_context.gop_size = max(1, round(float(self.rate)))
        if codec == "libx264":
            self.stream.options = {"crf": "23", "preset": "veryfast", "tune": "zerolatency"}
        else:
            self.stream.bit_rate = int(self.size[0] * self.size[1] * float(self.rate) * 0.3)
        if previous is not None:
            self._copy(previous, frames)
            previous.unlink()

    def _copy(self, previous: Path, frames: int) -> None:
        try:
            with av.open(str(previous)) as old:
                for frame in old.decode(video=0):
                    if self.frames >= frames:
                        break
                    self._encode(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            pass  # cut short by a kill: what decoded is kept

    def _encode(self, rgb: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: self.size[0], : self.size[1]]), format="rgb24")
        frame.pts = self.frames
        frame.time_base = 1 / self.rate
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def add(self, rgb: np.ndarray, outputs) -> None:
        """Draw the detections decoded from `outputs` on the RGB frame `rgb` and write it."""
        found = self.decoder(outputs)
        boxes = self.preprocess.to_frame(found.boxes, self.frame_hw)
        self._encode(draw_detections(np.array(rgb, np.uint8), boxes, found.scores, found.classes, self.names))

    def close(self) -> None:
        if self.container is None:
            return
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        finally:
            self.container.close()
            self.container = None
