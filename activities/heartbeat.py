"""Heartbeats from a background thread while a sync activity blocks (an agent call, a store
round trip), so that a short heartbeat timeout detects a killed worker without failing a batch
that is merely slow.

A thread-pool activity's ``activity.heartbeat`` reads the activity's context from a
contextvar and schedules the heartbeat on the worker's event loop (thread-safe), so another
thread may call it if it runs in a copy of the activity thread's context. The thread beats
with no details (the activities using this one keep their progress in the workflow, not in
heartbeat details), stops when the activity ends or is cancelled, and stops at the attempt's
start-to-close budget: a call that hangs is then timed out by the server, never kept alive."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator

from temporalio import activity

MAX_INTERVAL_S = 5.0


def _interval(heartbeat_timeout: float) -> float:
    """A quarter of the heartbeat timeout (so three beats in a row may be lost), at most 5 s."""
    return max(0.1, min(MAX_INTERVAL_S, heartbeat_timeout / 4))


@contextlib.contextmanager
def heartbeating() -> Iterator[None]:
    """Heartbeat every few seconds until the block ends (nothing when the activity has no
    heartbeat timeout)."""
    info = activity.info()
    if not info.heartbeat_timeout:
        yield
        return
    interval = _interval(info.heartbeat_timeout.total_seconds())
    budget = info.start_to_close_timeout or info.schedule_to_close_timeout
    deadline = time.monotonic() + budget.total_seconds() if budget else None
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            if activity.is_cancelled() or (deadline is not None and time.monotonic() >= deadline):
                return
            try:
                activity.heartbeat()
            except Exception:  # the worker is shutting down (its loop is gone): nothing to keep alive
                return

    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(beat,),
        name=f"heartbeat-{info.activity_id}",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
