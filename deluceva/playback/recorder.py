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

__all__ = ["FrameRecorder", "DetectionWriter", "written_frames"]

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
        if resume and frames:
            names = json.loads((self.parts / "names.json").read_text())
            self.arrays = {key: GrowingNpy.reopen(self.parts / file, frames) for file, key in names.items()}
            self.frames = frames
            return
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.parts.mkdir()

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


class DetectionWriter:
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
        self.path = Path(path)
        self.decoder, self.preprocess, self.frame_hw = decoder, preprocess, tuple(frame_hw)
        kept = _whole_lines(self.path)[:frames] if resume else []
        if len(kept) < (frames if resume else 0):
            raise DelucevaError(f"{self.path}: holds {len(kept)} frames, fewer than the {frames} to resume after")
        self.file = open(self.path, "w")
        self.file.writelines(kept)
        self.file.flush()
        self.frames = len(kept)

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
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        self.frames += 1

    def close(self) -> None:
        self.file.close()


def _whole_lines(path: Path) -> list[str]:
    """The lines of `path` that end in a newline (a killed writer may leave half a line)."""
    try:
        with open(path) as f:
            return [line for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def written_frames(outputs: str | os.PathLike | None, detections: str | os.PathLike | None) -> int:
    """How many frames a killed run wrote whole into every one of its files: OUT.npz's parts
    (each output's GrowingNpy) and the detections' lines. A resumed run starts at that frame."""
    counts = []
    if outputs:
        parts = Path(str(outputs) + ".parts")
        names = parts / "names.json"
        if names.is_file():
            counts += [GrowingNpy.frames_in(parts / file) for file in json.loads(names.read_text())]
        else:
            counts.append(0)
    if detections:
        counts.append(len(_whole_lines(Path(detections))))
    return min(counts) if counts else 0
