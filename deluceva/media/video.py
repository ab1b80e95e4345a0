"""Video in through PyAV: any file or stream URL FFmpeg decodes, as RGB uint8 frames.

Also a deterministic synthetic clip writer (PyAV's own encoders), for tests and the offline demo.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.parse
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["VideoReader", "open_video", "synthetic_frames", "write_test_clip", "synthesise_clip"]

# A source containing "scheme://" is a URL handed to FFmpeg as is (rtsp, http, udp, ...).
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# First bytes of containers that we recognise, so that an unreadable file that starts like a
# video is called damaged/truncated rather than "not a video".
_MAGIC = {
    b"ftyp": "MP4/MOV",  # at offset 4
    b"\x1aE\xdf\xa3": "Matroska/WebM",
    b"RIFF": "AVI",
    b"OggS": "Ogg",
    b"FLV": "FLV",
    b"\x00\x00\x01\xba": "MPEG-PS",
    b"G": "MPEG-TS",  # sync byte, checked with its 188-byte period below
}


_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443, "tcp": None, "udp": None}


def _reach(url: str, timeout: float) -> None:
    """Refuse a TCP stream whose host cannot be reached, saying so (FFmpeg reports an
    unroutable address as invalid data, as if the stream were not a video)."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _PORTS or scheme == "udp" or not parts.hostname:
        return
    try:
        port = parts.port or _PORTS[scheme]
    except ValueError:
        raise DelucevaError(f"{url}: bad port in the address") from None
    if port is None:
        return
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except socket.timeout:
        raise DelucevaError(f"{url}: timed out: {parts.hostname}:{port} did not answer within {timeout:g} s") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DelucevaError(f"{url}: unreachable: {parts.hostname}:{port} ({reason})") from None


def _looks_like_video(path: str) -> str | None:
    """Container name when the file's first bytes are a known video header, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"free", b"wide"):
        return "MP4/MOV"
    for magic, name in _MAGIC.items():
        if magic == b"G":
            if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
                return name
        elif magic != b"ftyp" and head.startswith(magic):
            return name
    return None


class VideoReader:
    """Frames of one video source, decoded on demand; iterate it to get RGB uint8 (H, W, 3).

    Attributes:
        source: the path or URL given.
        width, height: frame size in pixels.
        fps: frames per second (float; 0.0 when the container does not say).
        frame_count: frames in the source, or None when the container does not say (streams,
            Matroska). Counts the whole source, before `start`, `every` and `frames`.
        expected: how many frames iteration will yield, when known (for progress bars).
        truncated: set after iteration when decoding stopped early on damaged data; the frames
            before the damage were yielded, and a one-line warning was issued.
        frames_read: frames yielded by the last iteration.
        pts, time: the last yielded frame's timestamp, in the stream's time base and in seconds
            (None when the container gives none).

    Iterating twice reopens the source.
    """

    def __init__(self, source, frames: int | None = None, start: int = 0, every: int = 1,
                 timeout: float = 10.0, options: dict[str, str] | None = None):
        self.source = str(source)
        self._check_options(frames, start, every, timeout)
        self.frames, self.start, self.every = frames, start, every
        self.timeout = float(timeout)
        self.options = dict(options or {})
        self.truncated = False
        self.frames_read = 0
        self.pts = self.time = None  # the last frame yielded: its timestamp (stream units, seconds)
        container = self._open()
        try:
            stream = container.streams.video[0]
            ctx = stream.codec_context
            self.width, self.height = int(ctx.width), int(ctx.height)
            # guessed_rate is FFmpeg's r_frame_rate: right for AVIs whose index has empty
            # (dropped-frame) entries, where average_rate counts them and comes out doubled.
            rate = stream.guessed_rate or stream.average_rate or stream.base_rate
            self.fps = float(rate) if rate else 0.0
            self.frame_count = int(stream.frames) if stream.frames and stream.frames > 0 else None
            if self.frame_count is not None and container.format.name == "avi":
                self.frame_count = self._count_packets(container, stream)
            self.codec = ctx.name
        finally:
            container.close()
        if self.width <= 0 or self.height <= 0:
            raise DelucevaError(f"{self.source}: video stream has no frame size (damaged or unsupported)")
        if self.frame_count is not None and start >= self.frame_count:
            raise DelucevaError(f"{self.source}: --start {start} is past the last frame ({self.frame_count} frames)")
        self.expected = self._expected()

    def __repr__(self) -> str:
        return (f"VideoReader({self.source!r}, {self.width}x{self.height}, fps={self.fps:g}, "
                f"frame_count={self.frame_count}, start={self.start}, every={self.every}, frames={self.frames})")

    @staticmethod
    def _check_options(frames, start, every, timeout) -> None:
        if frames is not None and (not isinstance(frames, (int, np.integer)) or frames < 1):
            raise DelucevaError(f"frames must be a positive integer, got {frames!r}")
        if not isinstance(start, (int, np.integer)) or start < 0:
            raise DelucevaError(f"start must be a non-negative integer, got {start!r}")
        if not isinstance(every, (int, np.integer)) or every < 1:
            raise DelucevaError(f"every must be a positive integer, got {every!r}")
        if not timeout > 0:
            raise DelucevaError(f"timeout must be positive seconds, got {timeout!r}")

    def _expected(self) -> int | None:
        if self.frame_count is None:
            return self.frames
        n = -(-(self.frame_count - self.start) // self.every)
        return n if self.frames is None else min(n, self.frames)

    def _open(self):
        src = self.source
        is_url = bool(_URL.match(src))
        if not is_url:
            if not os.path.exists(src):
                raise DelucevaError(f"{src}: no such file")
            if os.path.isdir(src):
                raise DelucevaError(f"{src}: is a directory, not a video")
            if os.path.getsize(src) == 0:
                raise DelucevaError(f"{src}: empty file, not a video")
        if is_url:
            _reach(src, self.timeout)
        started = time.monotonic()
        try:
            # timeout bounds both the open and each read: a dead stream fails instead of hanging.
            container = av.open(src, mode="r", options=self.options, timeout=(self.timeout, self.timeout))
        except av.error.FileNotFoundError:
            raise DelucevaError(f"{src}: no such file") from None
        except (av.error.FFmpegError, OSError) as e:
            if is_url and time.monotonic() - started >= 0.9 * self.timeout:
                raise DelucevaError(f"{src}: timed out: no video within {self.timeout:g} s (a silent or stalled "
                                    "stream)") from None
            if isinstance(e, av.error.InvalidDataError):
                kind = None if is_url else _looks_like_video(src)
                if kind:
                    raise DelucevaError(f"{src}: {kind} file is truncated or damaged (FFmpeg cannot read its "
                                        "header/index)") from None
                if is_url:
                    raise DelucevaError(f"{src}: not a video stream (the server answered, but not with a stream "
                                        "FFmpeg recognises)") from None
                raise DelucevaError(f"{src}: not a video (FFmpeg does not recognise the file's format)") from None
            reason = getattr(e, "strerror", None) or str(e)
            if is_url:
                raise DelucevaError(f"{src}: cannot open stream ({reason})") from None
            raise DelucevaError(f"{src}: cannot open ({reason})") from None
        if not container.streams.video:
            container.close()
            raise DelucevaError(f"{src}: has no video stream")
        return container

    def __iter__(self) -> Iterator[np.ndarray]:
        container = self._open()
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: decode is a visible share of a run's time
        self.truncated = False
        self.frames_read = 0
        index = -1
        try:
            frames = container.decode(stream)
            while self.frames is None or self.frames_read < self.frames:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except (av.error.FFmpegError, OSError) as e:
                    # Damaged data mid-file: keep what decoded, stop cleanly, say so once.
                    self._stopped_early(index + 1, getattr(e, "strerror", None) or str(e))
                    break
                index += 1
                if index < self.start or (index - self.start) % self.every:
                    continue  # skipped frames are never converted: conversion is the costly part
                self.frames_read += 1
                self.pts, self.time = frame.pts, frame.time  # of the frame being yielded
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()
        if self.frames_read == 0:
            if self.truncated:
                raise DelucevaError(f"{self.source}: truncated or damaged, no frame could be decoded")
            raise DelucevaError(f"{self.source}: no frames decoded (start {self.start} is past the end?)")
        # With frame threading FFmpeg ends a cut stream quietly instead of raising, so compare
        # with the count the container's index lists (reliable for MP4; counted for AVI).
        if (not self.truncated and self.frame_count is not None and index + 1 < self.frame_count
                and (self.frames is None or self.frames_read < self.frames)):
            self._stopped_early(index + 1, f"the container lists {self.frame_count}")

    @staticmethod
    def _count_packets(container, stream) -> int | None:
        """Non-empty packets of an AVI's video stream: its index also lists empty (dropped) frames."""
        try:
            n = sum(1 for packet in container.demux(stream) if packet.size)
        except (av.error.FFmpegError, OSError):
            return None
        return n or None

    def _stopped_early(self, decoded: int, reason: str) -> None:
        self.truncated = True
        warnings.warn(f"{self.source}: truncated or damaged, stopped after {decoded} decoded frames ({reason})",
                      RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Nothing stays open between iterations; kept for `with` use."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_video(source, frames: int | None = None, start: int = 0, every: int = 1,
               timeout: float = 10.0, options: dict[str, str] | None = None) -> VideoReader:
    """Open a video file or stream URL for reading RGB uint8 frames.

    Args:
        source: a path (any container/codec FFmpeg decodes) or a URL FFmpeg accepts.
        frames: yield at most this many frames (None: all).
        start: skip this many frames of the source first.
        every: keep one frame in `every` (after `start`).
        timeout: seconds to wait when opening or reading a stream before failing.
        options: extra FFmpeg demuxer options, e.g. {"rtsp_transport": "tcp"}.

    Raises:
        DelucevaError: missing file, not a video, truncated header, stream that cannot be opened,
            no video stream, options out of range (one line, naming the source).

    Example:
        >>> video = open_video("clip.mp4", frames=10, every=2)   # doctest: +SKIP
        >>> [f.shape for f in video][:1]
        [(480, 640, 3)]
    """
    return VideoReader(source, frames=frames, start=start, every=every, timeout=timeout, options=options)


def synthetic_frames(width: int = 160, height: int = 96, frames: int = 48, objects: int = 3,
                     noise: float = 2.0, seed: int = 0) -> Iterator[np.ndarray]:
    """A static textured background with a few moving rectangles and blobs, plus mild noise.

    Deterministic for a given seed. Each object moves at constant velocity and bounces off the
    frame's edges, so that most of each frame stays still: the regime delta execution is for.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Smooth background: a few low-frequency waves per channel, then a fine static texture.
    background = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3, 3)
        background[..., c] = 110 + 50 * np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + ph * 2)
    background += rng.normal(0, 6, background.shape).astype(np.float32)
    things = []
    for k in range(objects):
        size = rng.uniform(0.12, 0.25, 2) * (height, width)
        things.append(dict(
            pos=rng.uniform(0, 1, 2) * ((height, width) - size), size=size,
            vel=rng.uniform(-1, 1, 2) * 0.02 * (height, width) + 0.5,
            colour=rng.uniform(20, 235, 3).astype(np.float32), blob=bool(k % 2)))
    for _ in range(frames):
        img = background.copy()
        for t in things:
            (y0, x0), (h, w) = t["pos"], t["size"]
            if t["blob"]:
                cy, cx = y0 + h / 2, x0 + w / 2
                mask = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
            else:
                mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
            img[mask] = t["colour"]
            t["pos"] = t["pos"] + t["vel"]
            for d, limit in enumerate((height, width)):
                if t["pos"][d] < 0 or t["pos"][d] + t["size"][d] > limit:
                    t["vel"][d] = -t["vel"][d]
                    t["pos"][d] = np.clip(t["pos"][d], 0, limit - t["size"][d])
        if noise > 0:
            img += rng.normal(0, noise, img.shape).astype(np.float32)
        yield np.clip(img + 0.5, 0, 255).astype(np.uint8)


def write_test_clip(path, frames: Iterable[np.ndarray], fps: int = 25, codec: str = "libx264",
                    quality: int = 18, options: dict[str, str] | None = None) -> Path:
    """Encode RGB uint8 frames into a video file with PyAV's encoders; returns the path.

    Args:
        path: output file; its suffix picks the container (.mp4, .mkv, .avi, ...).
        frames: RGB uint8 (H, W, 3) arrays, all the same even size.
        fps: frame rate.
        codec: "libx264" (falls back to "mpeg4" if this PyAV has no libx264), "mpeg4", "ffv1".
        quality: libx264 CRF (lower is better; ignored by other codecs).
        options: extra muxer options, e.g. {"movflags": "+faststart"}.
    """
    path = Path(path)
    if codec == "libx264" and "libx264" not in av.codecs_available:
        codec = "mpeg4"
    container = av.open(str(path), mode="w", options=dict(options or {}))
    try:
        stream = None
        for frame in frames:
            frame = np.ascontiguousarray(frame, np.uint8)
            if frame.ndim != 3 or frame.shape[2] != 3:
                raise DelucevaError(f"{path}: frames must be RGB uint8 (H, W, 3), got shape {frame.shape}")
            if stream is None:
                h, w = frame.shape[:2]
                if h % 2 or w % 2:
                    raise DelucevaError(f"{path}: frame size {w}x{h} must be even for yuv420p")
                stream = container.add_stream(codec, rate=fps)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv444p" if codec == "ffv1" else "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": str(quality), "preset": "veryfast"}
                elif codec == "mpeg4":
                    stream.bit_rate = int(w * h * fps * 0.6)  # ample for small test clips
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise DelucevaError(f"{path}: no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def synthesise_clip(path, width: int = 160, height: int = 96, frames: int = 48, fps: int = 25,
                    objects: int = 3, noise: float = 2.0, seed: int = 0, codec: str = "libx264",
                    options: dict[str, str] | None = None) -> Path:
    """Write a deterministic synthetic clip (see `synthetic_frames`) to `path`; returns the path.

    Example:
        >>> synthesise_clip("clip.mp4", frames=24)    # doctest: +SKIP
        PosixPath('clip.mp4')
    """
    return write_test_clip(path, synthetic_frames(width, height, frames, objects, noise, seed),
                           fps=fps, codec=codec, options=options)
