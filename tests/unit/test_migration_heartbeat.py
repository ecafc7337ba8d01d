"""``activities.heartbeat.heartbeating`` in an activity context (no server): it beats from a
background thread while the activity blocks, and stops when the activity ends, is cancelled or
has spent its start-to-close budget (a hung agent call is then timed out by the server, never
kept alive by the thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

from temporalio import activity
from temporalio.testing import ActivityEnvironment

from activities.heartbeat import heartbeating

DEADLINE_S = 30.0  # generous: the conditions below are met in well under a second


def beater() -> threading.Thread | None:
    named = [t for t in threading.enumerate() if t.name == f"heartbeat-{activity.info().activity_id}"]
    return named[0] if named else None


def until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def environment(
    heartbeat_s: float | None, budget_s: float = 600.0
) -> tuple[ActivityEnvironment, list[tuple]]:
    env = ActivityEnvironment()
    env.info = replace(
        env.info,
        activity_id="beats-1",
        heartbeat_timeout=timedelta(seconds=heartbeat_s) if heartbeat_s else None,
        start_to_close_timeout=timedelta(seconds=budget_s),
    )
    beats: list[tuple] = []
    env.on_heartbeat = lambda *details: beats.append(details)
    return env, beats


def test_it_beats_while_the_activity_blocks_and_stops_when_it_ends() -> None:
    env, beats = environment(heartbeat_s=0.4)
    threads: list[threading.Thread | None] = []

    def blocked() -> bool:
        with heartbeating():
            threads.append(beater())
            return until(lambda: len(beats) >= 3)  # the activity thread itself never beats here

    assert env.run(blocked)
    assert beats[:3] == [(), (), ()]  # no details: none of its users keep progress in them
    thread = threads[0]
    assert thread is not None and thread.daemon
    thread.join(DEADLINE_S)
    assert not thread.is_alive()


def test_it_stops_at_the_start_to_close_budget_while_the_call_still_hangs() -> None:
    env, beats = environment(heartbeat_s=0.4, budget_s=0.5)

    def hung() -> int:
        with heartbeating():
            thread = beater()
            assert thread is not None
            thread.join(DEADLINE_S)  # "hangs" until the thread gives up
            assert not thread.is_alive()
            return len(beats)

    before = env.run(hung)
    assert before == len(beats)


def test_it_stops_when_the_activity_is_cancelled() -> None:
    env, beats = environment(heartbeat_s=0.4)

    @activity.defn(no_thread_cancel_exception=True)
    def cancelled() -> None:
        with heartbeating():
            thread = beater()
            assert thread is not None and until(lambda: len(beats) >= 1)
            env.cancel()
            thread.join(DEADLINE_S)
            assert not thread.is_alive()

    env.run(cancelled)


def test_nothing_runs_without_a_heartbeat_timeout() -> None:
    env, beats = environment(heartbeat_s=None)

    def plain() -> threading.Thread | None:
        with heartbeating():
            return beater()

    assert env.run(plain) is None and beats == []
