"""Atomic file writes, torch-free (the ONNX sampler uses them too): a temporary file in the same folder,
fsync'ed, then renamed into place, so a crash at any moment leaves the old file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _file_mode() -> int:
    """The mode a plain open() would give a new file under the current umask (mkstemp gives 0600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_writable(path: str | os.PathLike) -> Path:
    """An output file path that can be written: not a folder, in an existing writable folder; else one
    FastVAEError line (raised before any work, so nothing is computed for nothing)."""
    from fastvae.errors import FastVAEError

    target = Path(path)
    if target.is_dir():
        raise FastVAEError(f"{path}: is a directory; give a file name")
    parent = target.resolve().parent
    if not parent.is_dir():
        raise FastVAEError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FastVAEError(f"{path}: the folder {parent} is not writable")
    return target
