"""Reading a secret file (a bearer token) without a check-then-use race.

The file is opened once, with ``O_NOFOLLOW`` (a symlink planted in its place is refused) and
``O_NONBLOCK`` (a FIFO cannot hang the reader); the checks run on the opened descriptor
(``fstat``: a regular file, owned by this user, no group or other permission bits) and the content
is read from that same descriptor. Nothing is looked up twice by path, so swapping the file
between the check and the read gains nothing.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """The file is missing, not a regular file of ours, or readable by others (no content in the text)."""


class PrivateFileMissing(PrivateFileError, FileNotFoundError):
    """There is no file at the path (also a FileNotFoundError, for callers that create it then)."""


def read_private(path: Path, *, limit: int = 4096) -> bytes:
    """The content of ``path`` (at most ``limit`` bytes, else refused), checked as described above."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise PrivateFileMissing(f"cannot read {path}: no such file") from None
    except OSError as exc:
        reason = "a symlink is refused" if exc.errno == errno.ELOOP else exc.strerror
        raise PrivateFileError(f"cannot read {path}: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PrivateFileError(f"{path} is not a regular file")
        if info.st_uid != os.getuid():
            raise PrivateFileError(f"{path} is owned by another user")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise PrivateFileError(
                f"{path} must not be accessible by group or others (mode {mode:04o}; chmod 600)"
            )
        chunks = []
        remaining = limit + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise PrivateFileError(f"{path} is larger than {limit} bytes")
    return data
