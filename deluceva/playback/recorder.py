"""Outputs written as the run goes: the model's outputs (`FrameRecorder`, see its docstring for
why a stopped run keeps every finished frame) and a detection preset's boxes in the source
video's pixels (`DetectionWriter`, one JSON line per frame)."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from deluceva.errors import DelucevaError
from deluceva.files import GrowingNpy

__all__ = ["FrameRecorder", "JsonLines", "DetectionWriter", "written_frames", "whole_lines"]

class FrameRecorder:
    """Writes named arrays frame by frame into OUT.npz, keyed by name, stacked over frames.

    While the run goes, each array grows in its own valid .npy under `OUT.npz.parts/`; `close()`
    (called at the end, and also on Ctrl-C or an error, from a `finally`) packs them into OUT.npz
    (uncompressed, written to a temporary name then renamed, so OUT.npz is never half-written) and
    removes the folder. A run killed without a chance to clean up (SIGKILL, power loss) still
    leaves `OUT.npz.parts/*.npy` (named in `names.json` there), each loadable with `np.load`,
    holding every finished frame.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, frames: int = 0):
        """With `resume`, the parts a killed run left are kept up to their first `frames` frames
        and grown from there (see `written_frames`); otherwise any are removed."""
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise DelucevaError(f"{self.path}: outputs file must end in .npz")
        if not self.path.parent.is_dir():
            raise DelucevaError(f"{self.path}: folder {self.path.parent} does not exist")
        self.parts = self.path.with_name(self.path.name + ".parts")
        self.arrays: dict[str, GrowingNpy] = {}
        self.frames = 0
        if resume and frames and not (self.parts / "names.json").is_file() and self.path.is_file():
            self._unpack(frames)  # a run stopped cleanly packed its parts: grow on from OUT.npz
        if resume and frames:
            names = json.loads((self.parts / "names.json").read_text())
            self.arrays = {key: GrowingNpy.reopen(self.parts / file, frames) for file, key in names.items()}
            self.frames = frames
            return
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir()

    def _unpack(self, frames: int) -> None:
        """Parts again from OUT.npz's first `frames` frames, read a frame at a time (an output
        over a long video need not fit in memory)."""
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir()
        names = {}
        try:
            with zipfile.ZipFile(self.path) as archive:
                for index, member in enumerate(archive.namelist()):
                    with archive.open(member) as stream:
                        shape, dtype = _npy_header(stream)
                        part = GrowingNpy(self.parts / f"{index:03d}.npy", shape[1:], dtype)
                        size = part.frame_bytes
                        for _ in range(min(frames, shape[0])):
                            part.append(np.frombuffer(stream.read(size), dtype).reshape(shape[1:]))
                        part.close()
                    names[part.path.name] = member.removesuffix(".npy")
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise DelucevaError(f"{self.path}: cannot resume it ({error})") from None
        (self.parts / "names.json").write_text(json.dumps(names, indent=1))

    def add(self, arrays: Mapping[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            value = np.asarray(value)
            if name not in self.arrays:
                if self.frames:
                    raise DelucevaError(f"{self.path}: {name!r} first appears at frame {self.frames}")
                part = self.parts / f"{len(self.arrays):03d}.npy"
                self.arrays[name] = GrowingNpy(part, value.shape, value.dtype)
                # Names may hold ':' or '/', so files are numbered and names.json maps them.
                names = {p.path.name: key for key, p in self.arrays.items()}
                (self.parts / "names.json").write_text(json.dumps(names, indent=1))
            self.arrays[name].append(value)
        self.frames += 1

    def keep(self, frames: int) -> None:
        """Drop every frame after the first `frames` (those of a frame whose other files were not
        all written), so that every array ends at the same frame."""
        for part in self.arrays.values():
            part.truncate(min(part.count, frames))
        self.frames = min(self.frames, frames)

    def close(self) -> None:
        """Pack the parts into OUT.npz. Where that fails (the folder's permissions changed, the
        disk filled), OUT.npz goes to the temporary folder instead and the DelucevaError says
        where; the parts stay until it is written somewhere."""
        from deluceva.files import fallback_path

        if self.parts is None:
            return
        target = self.path
        try:
            self._pack(target)
        except OSError as error:
            reason = error.strerror or type(error).__name__
            target = fallback_path(self.path)
            try:
                self._pack(target)
            except OSError:
                raise DelucevaError(f"{self.path}: cannot write it ({reason}); the frames are in {self.parts}") from None
            self._release()
            raise DelucevaError(f"{self.path}: cannot write it ({reason}); the outputs are in {target}") from None
        self._release()

    def _pack(self, target: Path) -> None:
        temporary = target.with_name(target.name + ".tmp")
        try:
            with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                for name, part in self.arrays.items():
                    with archive.open(f"{name}.npy", "w", force_zip64=True) as stream:
                        part.copy_into(stream)
            os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True) if temporary.parent.is_dir() else None
            raise

    def _release(self) -> None:
        for part in self.arrays.values():
            part.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        self.parts = None


class JsonLines:
    """A file of JSON lines, one per frame, flushed as each is written, so a stopped run keeps
    every finished frame's line.

    With `resume`, the first `frames` whole lines a killed run left are kept (the file is cut
    after them in place, never rewritten) and it grows from there; otherwise it starts empty.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, frames: int = 0):
        self.path = Path(path)
        self.ends: list[int] = []  # the byte offset after each line, for `keep`
        if resume:
            offset = 0
            for line in whole_lines(self.path)[:frames]:
                offset += len(line.encode())
                self.ends.append(offset)
            if len(self.ends) < frames:
                raise DelucevaError(f"{self.path}: holds {len(self.ends)} frames, fewer than the {frames} to resume after")
            self.file = open(self.path, "r+" if self.path.exists() else "w")
            self.file.seek(offset)
            self.file.truncate()
        else:
            self.file = open(self.path, "w")
        self.file.flush()

    @property
    def frames(self) -> int:
        return len(self.ends)

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.ends.append(self.file.tell())

    def keep(self, frames: int) -> None:
        """Drop every line after the first `frames`."""
        if frames < len(self.ends):
            del self.ends[frames:]
            self.file.truncate(self.ends[-1] if self.ends else 0)
            self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


class DetectionWriter(JsonLines):
    """Writes each frame's detections as one JSON line, in the source video's pixels:
    {"frame", "pts", "time", "boxes": [[x1, y1, x2, y2], ...], "scores", "classes"}.

    `decoder` turns the model's outputs into detections in model-input pixels (a preset's, see
    `deluceva.presets`); `preprocess.to_frame` undoes the letterbox, resize or padding. Each line
    is flushed as it is written, so a stopped run keeps every finished frame's line.

    Example:
        >>> writer = DetectionWriter("d.jsonl", decoder, preprocess, (480, 640))  # doctest: +SKIP
        >>> writer.add(0, outputs, pts=0, time=0.0); writer.close()            # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, decoder, preprocess, frame_hw: tuple[int, int],
                 resume: bool = False, frames: int = 0):
        """With `resume`, the first `frames` lines a killed run left are kept and the file grows
        from there; otherwise it starts empty."""
        self.decoder, self.preprocess, self.frame_hw = decoder, preprocess, tuple(frame_hw)
        super().__init__(path, resume, frames)

    def detections(self, outputs) -> dict:
        """The fields of one line for `outputs` (boxes in the source frame's pixels)."""
        found = self.decoder(outputs)
        boxes = self.preprocess.to_frame(found.boxes, self.frame_hw)
        return {"boxes": [[round(float(v), 2) for v in box] for box in boxes],
                "scores": [round(float(s), 4) for s in found.scores],
                "classes": [int(c) for c in found.classes]}

    def add(self, frame: int, outputs, pts=None, time=None) -> None:
        line = {"frame": int(frame), "pts": None if pts is None else int(pts),
                "time": None if time is None else round(float(time), 6), **self.detections(outputs)}
        super().add(line)


def whole_lines(path: Path) -> list[str]:
    """The lines of `path` that end in a newline (a killed writer may leave half a line)."""
    try:
        with open(path) as f:
            return [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def _npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if fortran or not shape:
        raise ValueError("not a stack of frames")
    return shape, dtype


def _frames_in_npz(path: Path) -> int:
    """The frames every array of a packed OUT.npz holds (0 when it cannot be read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            counts = []
            for member in archive.namelist():
                with archive.open(member) as stream:
                    counts.append(_npy_header(stream)[0][0])
            return min(counts) if counts else 0
    except (OSError, ValueError, zipfile.BadZipFile):
        return 0


def written_frames(outputs: str | os.PathLike | None, *lines: str | os.PathLike | None) -> int:
    """How many frames a killed run wrote whole into every one of its files: OUT.npz's parts
    (each output's GrowingNpy) and the JSON-lines files (detections, frame log) given. A resumed
    run starts at that frame: the smaller count is trusted and the others cut to it."""
    counts = []
    if outputs:
        parts = Path(str(outputs) + ".parts")
        names = parts / "names.json"
        if names.is_file():
            counts += [GrowingNpy.frames_in(parts / file) for file in json.loads(names.read_text())]
        else:  # packed by a run that stopped cleanly, or nothing yet
            counts.append(_frames_in_npz(Path(outputs)))
    counts += [len(whole_lines(Path(path))) for path in lines if path]
    return min(counts) if counts else 0
