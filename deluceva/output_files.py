"""Files deluceva writes: checked before any work starts, written whole or not at all.

`check_output` refuses, in one line and before a long run, a path that cannot be written: the
wrong suffix, a folder that does not exist, an existing folder in its place, or a folder where
a probe file cannot be created. `write_text` writes through a temporary file renamed into place;
if that still fails at the end (the disk filled, the folder's permissions changed during the
run), the result is written to the system's temporary folder instead and the one-line error
says where, so the work is not lost.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from deluceva.errors import DelucevaError

__all__ = ["check_output", "write_text", "fallback_path"]


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
