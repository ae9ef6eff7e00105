"""Atomic file writing, the one implementation every writer of the package goes through.

A file is written to a uniquely named temporary file in its own folder
(:func:`tempfile.mkstemp`), flushed to disk (``fsync``), given the mode a plain :func:`open`
would give a new file (``0o666`` less the umask, not ``mkstemp``'s ``0o600``) and moved over
the destination with :func:`os.replace`; the folder entry is then flushed too. A reader sees the
old file or the new one, never a mix, and two writers of the same path never share a temporary
file. On any error (a full disk, an interrupt) the temporary file is removed and the error
propagates; the destination is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "new_file_mode"]


def new_file_mode() -> int:
    """The mode :func:`open` gives a new file: ``0o666`` less the process umask.

    Read from ``/proc/self/status`` where there is one (no window in which another thread sees
    a changed umask); elsewhere the umask is read by setting it and setting it back at once.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Flush a folder entry (the rename of a saved file) to disk where the OS allows."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    write: Callable[[BinaryIO], None] | None = None,
    *,
    write_path: Callable[[str], None] | None = None,
) -> Path:
    """Write ``path`` atomically (module docs) and return it.

    Parameters
    ----------
    path
        The destination; its folder is created if missing.
    write
        Writes the content to an open binary file object (e.g. ``np.savez(fh, ...)``).
    write_path
        Instead of ``write``: writes the content to a file name (for writers that open the file
        themselves, such as netCDF); the file is then flushed to disk by name.
    """
    if (write is None) == (write_path is None):
        raise TypeError("give exactly one of write and write_path")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if write is not None:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            write_path(tmp_name)
            with open(tmp_name, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``."""
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 ``text``."""
    return atomic_write_bytes(path, text.encode("utf-8"))
