"""Files named on the command line: read them (``-`` is stdin), write plaintext safely."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from rekey.cli.output import CliError


class InputFileError(CliError):
    """A file named on the command line cannot be read or written."""


def read_input(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputFileError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read: {exc.strerror}") from None


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
