"""Files named on the command line: read them (``-`` is stdin), write plaintext safely."""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

from rekey.cli.output import CliError


class InputFileError(CliError):
    """A file named on the command line cannot be read or written."""


def read_input(path: Path, *, max_bytes: int | None = None, limit_name: str = "max_blob_bytes") -> bytes:
    """The bytes of ``path`` (``-``: stdin). With ``max_bytes``, a larger input is refused
    (`InputFileError` naming the setting ``limit_name``): a regular file by its size, before
    anything is read; stdin or a pipe once more than ``max_bytes`` have arrived."""
    if str(path) == "-":
        if max_bytes is None:
            return sys.stdin.buffer.read()
        data = sys.stdin.buffer.read(max_bytes + 1)
        _check_size(len(data), "stdin", max_bytes, limit_name, exact=False)
        return data
    try:
        with path.open("rb") as handle:
            if max_bytes is None:
                return handle.read()
            info = os.fstat(handle.fileno())
            if stat.S_ISREG(info.st_mode):
                _check_size(info.st_size, str(path), max_bytes, limit_name, exact=True)
            data = handle.read(max_bytes + 1)  # a file that grew, or a pipe, stops here too
            _check_size(len(data), str(path), max_bytes, limit_name, exact=False)
            return data
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc.strerror}") from None


def _check_size(size: int, what: str, max_bytes: int, limit_name: str, *, exact: bool) -> None:
    if size > max_bytes:
        measured = f"{size} bytes" if exact else f"more than {max_bytes} bytes"
        raise InputFileError(
            f"{what}: {measured}, above the limit of {max_bytes} ({limit_name}; raise it in"
            f" rekey.toml or REKEY_{limit_name.upper()})"
        )


def write_output(path: Path, data: bytes) -> None:
    """Write plaintext atomically, readable by the owner only (``-`` is stdout)."""
    if str(path) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.")
    except OSError as exc:
        raise InputFileError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputFileError(f"{path}: cannot write: {exc.strerror}") from None
