"""Files deluceva reads and writes: outputs checked before any work starts, written whole or not at
all; JSON inputs read with one-line errors.

`check_output` refuses, in one line and before a long run, a path that cannot be written: the
wrong suffix, a folder that does not exist, an existing folder in its place, or a folder where
a probe file cannot be created. `write_text` writes through a temporary file renamed into place;
if that still fails at the end (the disk filled, the folder's permissions changed during the
run), the result is written to the system's temporary folder instead and the one-line error
says where, so the work is not lost. `GrowingNpy` is a .npy file that stays valid while it grows, frame by
frame.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from deluceva.errors import DelucevaError

__all__ = ["check_output", "write_text", "write_json", "fallback_path", "read_json", "GrowingNpy"]


def check_output(path: str | os.PathLike | None, suffix: str | tuple[str, ...], option: str) -> Path | None:
    """The output path, checked (see the module docstring); None stays None.

    Example:
        >>> check_output("summary.json", ".json", "--summary")   # doctest: +SKIP
        PosixPath('summary.json')
    """
    if path is None:
        return None
    target = Path(path)
    suffixes = (suffix,) if isinstance(suffix, str) else tuple(suffix)
    if target.suffix.lower() not in suffixes:
        raise DelucevaError(f"{path}: {option} file must end in {' or '.join(suffixes)}")
    if target.is_dir():
        raise DelucevaError(f"{path}: {option} names an existing folder, not a file")
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise DelucevaError(f"{path}: {folder} is a file, not a folder")
    if not folder.is_dir():
        raise DelucevaError(f"{path}: folder {folder} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{target.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise DelucevaError(f"{path}: cannot write in folder {folder} ({error.strerror or type(error).__name__})") from None
    return target


def fallback_path(path: Path) -> Path:
    """Where a result goes when `path` cannot be written at the end: the temporary folder."""
    return Path(tempfile.gettempdir()) / f"deluceva-{os.getpid()}-{path.name}"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` whole (a temporary file renamed into place), or, failing that, to
    `fallback_path` and raise a DelucevaError that says where it is."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        temporary.replace(path)
        return path
    except OSError as error:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass
        reason = error.strerror or type(error).__name__
        rescue = fallback_path(path)
        try:
            rescue.write_text(text)
        except OSError:
            raise DelucevaError(f"{path}: cannot write it ({reason}), nor a copy in {rescue.parent}") from None
        raise DelucevaError(f"{path}: cannot write it ({reason}); the result is in {rescue}") from None


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """`data` as indented JSON through `write_text` (numpy scalars and arrays as numbers and lists)."""
    return write_text(path, json.dumps(data, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_json(path: str | os.PathLike, kind: str):
    """The JSON in `path`; a one-line DelucevaError naming the file when it cannot be read.

    `kind` names what the file should be ("profile", "plan") in the messages.
    """
    label = str(path)
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise DelucevaError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise DelucevaError(f"{label}: is a directory, not a {kind}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DelucevaError(f"{label}: cannot read {kind} ({type(error).__name__})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DelucevaError(f"{label}: not a deluceva {kind} (invalid JSON at line {error.lineno})") from None



_HEADER_BYTES = 256  # fixed, so the frame count can be rewritten in place as frames arrive


class GrowingNpy:
    """A .npy file of shape (frames, *frame_shape) that grows one frame at a time.

    The header is written with room to spare and rewritten in place after each frame's data is
    flushed, so the file is a valid .npy holding every finished frame at any moment: a crash or a
    kill leaves at worst one frame of trailing bytes, which `np.load` ignores.
    """

    def __init__(self, path: Path, frame_shape: tuple[int, ...], dtype: np.dtype):
        self.path = Path(path)
        self.frame_shape = tuple(int(d) for d in frame_shape)
        self.dtype = np.dtype(dtype)
        self.frame_bytes = int(np.prod(self.frame_shape, dtype=np.int64)) * self.dtype.itemsize
        self.count = 0
        self.file = open(self.path, "w+b")
        self._write_header()

    @classmethod
    def reopen(cls, path: Path, frames: int) -> GrowingNpy:
        """An existing GrowingNpy file, to grow on after its first `frames` frames (any after
        them, or a half-written one, are overwritten)."""
        path = Path(path)
        try:
            existing = np.load(path, mmap_mode="r")
            frame_shape, dtype, count = existing.shape[1:], existing.dtype, len(existing)
            del existing
        except (OSError, ValueError) as error:
            raise DelucevaError(f"{path}: cannot resume it ({error})") from None
        if count < frames:
            raise DelucevaError(f"{path}: holds {count} frames, fewer than the {frames} to resume after")
        grown = cls.__new__(cls)
        grown.path, grown.frame_shape, grown.dtype = path, tuple(frame_shape), np.dtype(dtype)
        grown.frame_bytes = int(np.prod(grown.frame_shape, dtype=np.int64)) * grown.dtype.itemsize
        grown.count = int(frames)
        grown.file = open(path, "r+b")
        grown.file.truncate(_HEADER_BYTES + grown.count * grown.frame_bytes)
        grown._write_header()
        return grown

    @staticmethod
    def frames_in(path: Path) -> int:
        """How many whole frames the file at `path` holds (0 when it cannot be read)."""
        try:
            return len(np.load(path, mmap_mode="r"))
        except (OSError, ValueError):
            return 0

    def _header(self) -> bytes:
        text = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": (self.count, *self.frame_shape)})
        prefix = b"\x93NUMPY\x01\x00"
        room = _HEADER_BYTES - len(prefix) - 2
        body = text.encode("latin1").ljust(room - 1) + b"\n"
        if len(body) > room:
            raise DelucevaError(f"{self.path}: output shape {self.frame_shape} is too long for the header")
        return prefix + len(body).to_bytes(2, "little") + body

    def _write_header(self) -> None:
        self.file.seek(0)
        self.file.write(self._header())
        self.file.flush()

    def append(self, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, self.dtype)
        if value.shape != self.frame_shape:
            raise DelucevaError(f"{self.path.name}: frame {self.count} has shape {value.shape}, earlier frames {self.frame_shape}")
        self.file.seek(_HEADER_BYTES + self.count * self.frame_bytes)
        self.file.write(value.tobytes())
        self.file.flush()
        self.count += 1
        self._write_header()

    def truncate(self, frames: int) -> None:
        """Keep only the first `frames` frames."""
        if frames < self.count:
            self.count = int(frames)
            self.file.truncate(_HEADER_BYTES + self.count * self.frame_bytes)
            self._write_header()

    def read(self, index: int) -> np.ndarray:
        """Frame `index`, read with a plain file read (no memory map, so it adds nothing to RSS)."""
        self.file.seek(_HEADER_BYTES + index * self.frame_bytes)
        data = self.file.read(self.frame_bytes)
        return np.frombuffer(data, self.dtype).reshape(self.frame_shape)

    def copy_into(self, stream) -> None:
        """Write the valid part (header and finished frames) into a writable binary stream."""
        self.file.flush()
        self.file.seek(0)
        remaining = _HEADER_BYTES + self.count * self.frame_bytes
        while remaining:
            chunk = self.file.read(min(remaining, 1 << 24))
            if not chunk:
                break
            stream.write(chunk)
            remaining -= len(chunk)

    def close(self) -> None:
        if not self.file.closed:
            self.file.close()
