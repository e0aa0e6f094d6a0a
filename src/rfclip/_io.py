"""Atomic file writes: every file rfclip produces appears whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it is renamed onto ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content (or stays absent). The file gets
    the usual permissions (``mkstemp`` alone would make it private). Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, default_file_mode())
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable_file(path: str | os.PathLike, fix: str) -> Path:
    """Check, before any work, that ``path`` can be written: not a folder, and its folder exists and is writable
    or can be created. Writes nothing. Raises a one-line :class:`RfclipError` ending in ``fix``."""
    from .errors import RfclipError

    path = Path(path).expanduser()
    if path.is_dir():
        raise RfclipError(f"cannot write {path}: it is a folder; {fix}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RfclipError(f"cannot write {path}: {parent} is a file, not a folder; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RfclipError(f"cannot write {path}: permission denied in {parent}; {fix}")
    return path


def file_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular file one can read, in words ("is a folder", "is a named pipe (FIFO)", ...), or
    None when it is one. Never opens the path (opening a FIFO would wait for a writer forever)."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (a link that points back to itself)"
        if err.errno == errno.EACCES:
            return "cannot be reached: permission denied"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return "broken symbolic link (its target does not exist)" if os.path.islink(path) else "not found"
        return f"cannot be read: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO), not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


_HASHES: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file, or of a folder's files (name and content, sorted), to say which weights were used; None
    when it cannot be read. Remembered per (path, size, modification time): a run hashes a checkpoint once."""
    import hashlib

    path = Path(path)
    try:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if key not in _HASHES:
            total = hashlib.sha256()
            for p in files:
                digest = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                if len(files) == 1 and p == path:
                    total = digest
                else:
                    total.update(f"{p.relative_to(path)}\0{digest.hexdigest()}\n".encode())
            _HASHES[key] = total.hexdigest()
        return _HASHES[key]
    except OSError:
        return None
