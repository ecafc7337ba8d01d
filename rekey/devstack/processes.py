"""Processes of the dev stack: starting one in its own session, pid files, whether a pid still
belongs to the command line we started (pids get reused), and stopping a process group."""

from __future__ import annotations

import json
import os
import signal
import subprocess  # starts the dev stack's binaries  # nosec B404
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

__all__ = [
    "STOP_TIMEOUT",
    "pid_alive",
    "proc_start_ticks",
    "read_record",
    "record_is_live",
    "spawn",
    "terminate",
]

STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL

# Popen objects of processes started by this interpreter, so ``down`` in the same
# process reaps them instead of leaving zombies behind.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(command: list[str], env: Mapping[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start ``command`` in a session of its own (it outlives us), output appended to ``log``."""
    process = subprocess.Popen(  # argument list, no shell  # nosec B603
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    _CHILDREN[process.pid] = process
    return process


def read_record(pid_file: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(pid_file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as stale
    return record if isinstance(record, dict) else {}


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 is the state)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (reaping it if it is our child)."""
    if pid <= 0:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    if not Path("/proc").is_dir():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = _proc_stat(pid)
    return fields is not None and bool(fields) and fields[0] not in ("Z", "X")


def _cmdline_matches(actual: list[str], expected: list[str]) -> bool:
    """``actual`` runs ``expected``, allowing for an interpreter or exec'd binary in front.

    Python console scripts show up as ``python3 <script> args`` and ``bao`` execs its
    bundled binary, so compare the arguments exactly and the program by base name.
    """
    if not expected or not actual:
        return False
    args = expected[1:]
    if len(actual) < len(args) + 1 or actual[len(actual) - len(args) :] != args:
        return False
    program = os.path.basename(expected[0])
    head = actual[: len(actual) - len(args)]
    return any(os.path.basename(part) == program for part in head)


def record_is_live(record: dict[str, Any]) -> bool:
    """The pid file names a live process that is still the one we started."""
    pid = record.get("pid")
    cmdline = record.get("cmdline")
    if not isinstance(pid, int) or not isinstance(cmdline, list) or not pid_alive(pid):
        return False
    if not Path("/proc").is_dir():
        return True
    actual = _proc_cmdline(pid)
    if actual is None or not _cmdline_matches(actual, [str(part) for part in cmdline]):
        return False
    expected_start = record.get("proc_start")
    return expected_start is None or expected_start == proc_start_ticks(pid)


def terminate(pid: int) -> bool:
    """SIGTERM the process group of ``pid``, SIGKILL after a timeout. True if killed."""

    def send(sig: signal.Signals) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    send(signal.SIGTERM)
    if wait(STOP_TIMEOUT):
        return False
    send(signal.SIGKILL)
    wait(5.0)
    return True
