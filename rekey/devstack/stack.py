"""``up``, ``down`` and ``status`` of the dev stack: start what is not running (and stop again
what this call started if a later component fails), stop what the pid files name, report."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess  # starts the dev stack's binaries  # nosec B404
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

from emulators import servers
from rekey.config import Settings
from rekey.devstack.component import HOST, Component, ComponentStatus, State
from rekey.devstack.components import COMPONENTS
from rekey.devstack.errors import ComponentFailed, DevStackError, PortInUse, one_line
from rekey.devstack.files import absolute, log_tail, write_atomic
from rekey.devstack.processes import (
    pid_alive,
    proc_start_ticks,
    read_record,
    record_is_live,
    spawn,
    terminate,
)
from rekey.devstack.throttle import ThrottleChoice, carried_by, read_choice, write_choice

__all__ = ["Echo", "down", "status", "up"]

Echo = Callable[[str], None]


def up(
    settings: Settings,
    echo: Echo = print,
    components: Sequence[Component] | None = None,
    throttle: ThrottleChoice | None = None,
) -> list[ComponentStatus]:
    """Start every component that is not already running; return their status.

    ``throttle`` sets the stack's throttle profile (kept in ``<home>/devstack.json``; None keeps
    the one it has). On failure the processes this call started are stopped again (already
    running ones are left alone) and :class:`DevStackError` is raised.
    """
    results: list[ComponentStatus] = []
    started: list[tuple[Component, int]] = []
    with _lock(settings):
        _set_throttle(settings, throttle)
        chosen = _chosen(settings, components, running_too=False)
        if components is None:
            _stop_unwanted(settings, echo)
        try:
            for component in chosen:
                result = _up_one(component, settings, started)
                results.append(result)
                echo(_describe(component, result))
        except BaseException:
            for component, pid in reversed(started):
                terminate(pid)
                _pid_file(settings, component).unlink(missing_ok=True)
            raise
    return results


def down(
    settings: Settings,
    echo: Echo = print,
    components: Sequence[Component] | None = None,
) -> list[ComponentStatus]:
    """Stop the processes named in the pid files (last started first)."""
    results: list[ComponentStatus] = []
    with _lock(settings):
        chosen = _chosen(settings, components)
        for component in reversed(chosen):
            pid_file = _pid_file(settings, component)
            record = read_record(pid_file)
            if record is None:
                result = ComponentStatus(component.name, "stopped", note="not running")
            elif not record_is_live(record):
                pid_file.unlink(missing_ok=True)
                result = ComponentStatus(
                    component.name, "stopped", note="not running (removed stale pid file)"
                )
            else:
                pid = int(record["pid"])
                killed = terminate(pid)
                pid_file.unlink(missing_ok=True)
                how = "killed after timeout" if killed else "stopped"
                lost = f"; {component.lost_on_stop}" if component.lost_on_stop else ""
                result = ComponentStatus(component.name, "stopped", pid, note=f"{how} (pid {pid}){lost}")
            results.append(result)
            echo(f"{component.name}: {result.note}")
    results.reverse()
    return results


def status(
    settings: Settings,
    components: Sequence[Component] | None = None,
) -> list[ComponentStatus]:
    """Report each component as running, stopped or unhealthy (starts nothing)."""
    results: list[ComponentStatus] = []
    for component in _chosen(settings, components):
        record = read_record(_pid_file(settings, component))
        notes = [component.note] if component.note else []
        throttle = carried_by(settings, component.name)
        if throttle:
            notes.append(f"throttle profile {read_choice(settings).label()}")
        if record is None or not record_is_live(record):
            if record is not None:
                notes.insert(0, "stale pid file")
            busy = [p for p in component.ports(settings) if not servers.port_free(p)]
            if busy:
                notes.insert(0, f"port {busy[0]} is in use by another process")
            stopped = ComponentStatus(component.name, "stopped", note="; ".join(notes), throttle=throttle)
            results.append(stopped)
            continue
        reason = component.health(settings)
        state: State = "running" if reason is None else "unhealthy"
        if reason:
            notes.insert(0, reason)
        results.append(
            ComponentStatus(
                component.name,
                state,
                int(record["pid"]),
                component.endpoints(settings),
                "; ".join(notes),
                throttle,
            )
        )
    return results


def _chosen(
    settings: Settings, components: Sequence[Component] | None, *, running_too: bool = True
) -> list[Component]:
    """The components a call works on: those given, else every wanted one (and, with
    ``running_too``, an unwanted one that a live pid file says still runs)."""
    if components is not None:
        return list(components)
    return [c for c in COMPONENTS if c.wanted(settings) or (running_too and _is_running(settings, c))]


def _is_running(settings: Settings, component: Component) -> bool:
    record = read_record(_pid_file(settings, component))
    return record is not None and record_is_live(record)


def _set_throttle(settings: Settings, throttle: ThrottleChoice | None) -> None:
    """Persist the new throttle choice; refuse one that would move a running moto (the aws-kms
    profile puts the proxy on moto's port), since moto loses its keys when it stops."""
    current = read_choice(settings)
    if throttle is None or throttle == current:
        return
    moto = next(c for c in COMPONENTS if c.name == "moto")
    if (current.profile == "aws-kms") != (throttle.profile == "aws-kms") and _is_running(settings, moto):
        raise DevStackError(
            f"the dev stack runs with throttle profile {current.label()}; switching the aws-kms profile "
            "on or off moves moto, which loses its keys when it stops: run `rekey dev down` first"
        )
    write_choice(settings, throttle)


def _stop_unwanted(settings: Settings, echo: Echo) -> None:
    """Stop a stateless optional component the profile no longer wants (the throttle proxy)."""
    for component in COMPONENTS:
        if component.wanted(settings) or not component.restart_on_change:
            continue
        pid_file = _pid_file(settings, component)
        record = read_record(pid_file)
        if record is not None and record_is_live(record):
            terminate(int(record["pid"]))
            echo(f"{component.name}: stopped (not part of throttle profile {read_choice(settings).label()})")
        pid_file.unlink(missing_ok=True)


def _up_one(
    component: Component,
    settings: Settings,
    started: list[tuple[Component, int]],
) -> ComponentStatus:
    name = component.name
    pid_file = _pid_file(settings, component)
    record = read_record(pid_file)
    if (
        record is not None
        and record_is_live(record)
        and component.restart_on_change
        and record.get("cmdline") != component.command(settings)
    ):
        terminate(int(record["pid"]))  # stateless and its settings changed: start it anew
        pid_file.unlink(missing_ok=True)
        record = None
    if record is not None and record_is_live(record):
        pid = int(record["pid"])
        deadline = time.monotonic() + component.start_timeout
        try:
            component.wait_ready(settings, deadline, lambda: pid_alive(pid))
            component.after_start(settings, deadline)
        except Exception as exc:
            raise ComponentFailed(
                f"{name} is running (pid {pid}) but not healthy: {one_line(exc)}; "
                "run `rekey dev down` and try again"
            ) from None
        return _status_of(component, settings, pid, "already running")
    if record is not None:
        pid_file.unlink(missing_ok=True)

    command = component.command(settings)  # raises BinaryMissing first
    for port in component.ports(settings):
        if not servers.port_free(port):
            raise PortInUse(
                f"cannot start {name}: {HOST}:{port} is already in use "
                f"({component.port_hint(settings, port)})"
            )
    component.prepare(settings)
    log_file = _log_file(settings, component)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        log.write(f"--- {_now()} rekey dev up: {' '.join(command)}\n".encode())
        log.flush()
        log_offset = log.tell()
        # rekey children see the settings this stack uses
        process = spawn(command, os.environ | settings.environ(), log)
    started.append((component, process.pid))
    write_atomic(
        pid_file,
        json.dumps(
            {
                "pid": process.pid,
                "cmdline": command,
                "ports": component.ports(settings),
                "started_at": _now(),
                "proc_start": proc_start_ticks(process.pid),
            },
            indent=2,
        )
        + "\n",
    )
    began = time.monotonic()
    deadline = began + component.start_timeout
    try:
        component.wait_ready(settings, deadline, lambda: process.poll() is None)
        component.after_start(settings, deadline)
    except Exception as exc:
        # Give a crashing process a moment to flush its last words to the log.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.5)
        tail = log_tail(log_file, log_offset)
        raise ComponentFailed(
            f"{name} failed to start: {one_line(exc)}"
            + (f"; log {log_file}: {tail}" if tail else f"; see {log_file}")
        ) from None
    return _status_of(component, settings, process.pid, f"started in {time.monotonic() - began:.1f}s")


def _status_of(component: Component, settings: Settings, pid: int, note: str) -> ComponentStatus:
    throttle = carried_by(settings, component.name)
    profile = f"throttle profile {read_choice(settings).label()}" if throttle else ""
    notes = "; ".join(n for n in (note, component.note, profile) if n)
    return ComponentStatus(component.name, "running", pid, component.endpoints(settings), notes, throttle)


def _describe(component: Component, result: ComponentStatus) -> str:
    """One line for ``up``: what happened, the pid, the endpoints, the standing note."""
    how = result.note.split("; ")[0] if result.note else ""
    where = " ".join(f"{key}={value}" for key, value in result.endpoints.items())
    line = f"{result.name}: {how} (pid {result.pid}) {where}".rstrip()
    standing = "; ".join(n for n in result.note.split("; ")[1:] if n)
    return f"{line} [{standing}]" if standing else line


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _pid_file(settings: Settings, component: Component) -> Path:
    return absolute(settings.home) / "run" / f"{component.name}.json"


def _log_file(settings: Settings, component: Component) -> Path:
    return absolute(settings.home) / "logs" / f"{component.name}.log"


@contextlib.contextmanager
def _lock(settings: Settings) -> Iterator[None]:
    """Serialise ``up`` and ``down`` on one state directory."""
    run_dir = absolute(settings.home) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
