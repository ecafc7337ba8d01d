"""Files of the dev stack under the state directory: atomic writes, the OpenBao init file
(mode 0600 from the first byte), and the tail of a component's log for error messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import IO

__all__ = ["LOG_TAIL_LINES", "absolute", "log_tail", "write_atomic", "write_secret_json"]

LOG_TAIL_LINES = 5

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def absolute(path: Path) -> Path:
    """``path`` made absolute against the current directory (symlinks are not resolved)."""
    return Path(os.path.abspath(path))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_secret_json(path: Path, data: dict[str, str]) -> None:
    """Create ``path`` with mode 0600 from the first byte on; never overwrite."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    handle: IO[str]
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(data, handle)
        handle.write("\n")


def log_tail(log_file: Path, offset: int) -> str:
    """The last few non-empty lines written since ``offset``, joined into one line."""
    try:
        with log_file.open("rb") as handle:
            handle.seek(offset)
            text = handle.read()[-16384:].decode(errors="replace")
    except OSError:
        return ""
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line[:200] for line in lines if line][-LOG_TAIL_LINES:]
    return " | ".join(lines)
