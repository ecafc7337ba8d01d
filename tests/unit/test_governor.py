"""The throttling governor, on a fake clock: nothing here sleeps for real or asserts wall time."""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_adapters.accounting import accounting
from kms_adapters.errors import AnswerLost, KmsError, NotFound, PolicyDenied, Throttled, Unavailable
from kms_adapters.governor import (
    PROGRESS_STEP,
    CircuitOpen,
    Governor,
    PassThroughGovernor,
    governor_for,
    reporting_progress,
    reset_governors,
)

ENDPOINT = "https://kms.test"


class FakeTime:
    """A clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(ft: FakeTime, seed: int = 0, **kwargs: Any) -> Governor:
    return Governor(ENDPOINT, clock=ft.clock, sleep=ft.sleep, rng=random.Random(seed), **kwargs)


def failing(errors: list[BaseException], result: Any = "ok") -> Callable[[], Any]:
    """A call that raises the given errors in turn, then returns ``result``; counts its calls."""
    queue = list(errors)

    def fn() -> Any:
        fn.calls += 1  # type: ignore[attr-defined]
        if queue:
            raise queue.pop(0)
        return result

    fn.calls = 0  # type: ignore[attr-defined]
    return fn


# ---------------------------------------------------------------------------- retries and backoff


def test_success_passes_through_unbounded() -> None:
    ft = FakeTime()
    gov = make(ft)
    assert gov.call(lambda: 42, op="encrypt") == 42
    s = gov.stats()
    assert (s["attempts"], s["successes"], s["retries"], s["current_rate"], s["state"]) == (
        1,
        1,
        0,
        None,
        "closed",
    )
    assert ft.sleeps == []


def test_retries_throttled_then_succeeds() -> None:
    ft = FakeTime()
    gov = make(ft)
    fn = failing([Throttled("slow down"), Throttled("slow down")], result="done")
    assert gov.call(fn, op="rewrap") == "done"
    assert fn.calls == 3  # type: ignore[attr-defined]
    s = gov.stats()
    assert (s["attempts"], s["successes"], s["throttled"], s["retries"]) == (3, 1, 2, 2)
    assert s["current_rate"] is not None  # the first throttle turned the rate limiter on
    assert ft.now >= 2 * 0.05  # backed off at least the base twice


def test_snapshot_is_the_typed_form_of_stats() -> None:
    ft = FakeTime()
    gov = make(ft)
    gov.call(failing([Throttled("slow down")], result="done"), op="rewrap")
    snap = gov.snapshot()
    assert (snap.attempts, snap.successes, snap.throttled, snap.state) == (2, 1, 1, "closed")
    assert dataclasses.asdict(snap) == gov.stats()


def test_honours_retry_after() -> None:
    ft = FakeTime()
    gov = make(ft)
    fn = failing([Throttled("429", retry_after=2.5), Unavailable("503", retry_after=4.0)])
    assert gov.call(fn) == "ok"
    backoffs = [s for s in ft.sleeps if s >= 1.0]
    assert backoffs == [2.5, 4.0]  # jitter of the first two retries is <= 0.45 s, so retry_after rules


def test_jitter_longer_than_retry_after_wins() -> None:
    ft = FakeTime()
    gov = make(ft, backoff_base=1.0, backoff_cap=5.0)
    gov.call(failing([Unavailable("503", retry_after=0.01)]))
    assert len(ft.sleeps) == 1 and 1.0 <= ft.sleeps[0] <= 3.0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**32 - 1))
def test_decorrelated_jitter_bounds(seed: int) -> None:
    ft = FakeTime()
    base, cap = 0.05, 5.0
    # Unavailable does not touch the rate limiter, so every sleep is a backoff.
    gov = make(
        ft, seed, backoff_base=base, backoff_cap=cap, max_attempts=25, max_time=1e9, failure_threshold=1000
    )
    with pytest.raises(Unavailable):
        gov.call(failing([Unavailable("down")] * 100))
    assert len(ft.sleeps) == 24
    previous = base
    for s in ft.sleeps:
        assert base <= s <= min(cap, 3 * previous)
        previous = s
    assert len(set(ft.sleeps[:5])) == 5  # jittered, not a fixed schedule


def test_backoff_is_capped() -> None:
    ft = FakeTime()
    gov = make(ft, backoff_base=0.05, backoff_cap=0.2, max_attempts=30, failure_threshold=1000)
    with pytest.raises(Unavailable):
        gov.call(failing([Unavailable("down")] * 100))
    assert max(ft.sleeps) == 0.2
    assert ft.sleeps.count(0.2) > 10


def test_gives_up_after_max_attempts_with_the_last_error() -> None:
    ft = FakeTime()
    gov = make(ft, max_attempts=3, failure_threshold=1000)
    last = Unavailable("third")
    fn = failing([Unavailable("first"), Unavailable("second"), last])
    with pytest.raises(Unavailable) as err:
        gov.call(fn)
    assert err.value is last
    assert fn.calls == 3  # type: ignore[attr-defined]
    assert gov.stats()["gave_up"] == 1


def test_gives_up_after_max_time() -> None:
    ft = FakeTime()
    gov = make(ft, max_attempts=10_000, max_time=60.0, failure_threshold=10_000, budget_capacity=10_000)
    with pytest.raises(Unavailable):
        gov.call(failing([Unavailable("down")] * 10_000))
    assert 30.0 < ft.now <= 60.0
    assert gov.stats()["gave_up"] == 1


def test_retry_budget_exhaustion_raises_the_retryable_error() -> None:
    ft = FakeTime()
    gov = make(ft, budget_capacity=3, failure_threshold=1000)
    always = failing([Unavailable("down")] * 100)
    with pytest.raises(Unavailable) as err:
        gov.call(always)
    assert err.value.retryable
    assert always.calls == 4  # type: ignore[attr-defined]  # 1 try + 3 retries, then the budget is empty
    assert gov.stats()["budget_exhausted"] == 1

    # With the budget empty a second call gets no retry at all ...
    with pytest.raises(Unavailable):
        gov.call(always)
    assert always.calls == 5  # type: ignore[attr-defined]
    # ... until successes refill it: 10 successes x 0.1 = one retry.
    for _ in range(10):
        gov.call(lambda: None)
    assert gov.call(failing([Unavailable("blip")])) == "ok"
    s = gov.stats()
    assert (s["retries"], s["budget_exhausted"]) == (4, 2)


@pytest.mark.parametrize(
    "error", [NotFound("no such key"), PolicyDenied(["svn too low"]), ValueError("bug"), KeyError("x")]
)
def test_non_retryable_passes_through_at_once(error: BaseException) -> None:
    ft = FakeTime()
    gov = make(ft)
    fn = failing([error])
    with pytest.raises(type(error)) as err:
        gov.call(fn)
    assert err.value is error
    assert fn.calls == 1  # type: ignore[attr-defined]
    assert ft.sleeps == []
    s = gov.stats()
    assert (s["retries"], s["throttled"], s["current_rate"]) == (0, 0, None)


def test_non_retryable_does_not_touch_an_enforced_rate() -> None:
    ft = FakeTime()
    gov = make(ft)
    gov.call(failing([Throttled("slow down")]))
    rate = gov.current_rate
    with pytest.raises(NotFound):
        gov.call(failing([NotFound("gone")]))
    assert gov.current_rate == rate
    assert gov.stats()["rate_cuts"] == 1


def test_waiting_never_holds_the_lock() -> None:
    ft = FakeTime()
    holder: list[Governor] = []

    def sleep(seconds: float) -> None:
        # Another thread can read the governor meanwhile: the wait holds none of its locks.
        reader = threading.Thread(target=holder[0].snapshot, daemon=True)
        reader.start()
        reader.join(timeout=10)
        assert not reader.is_alive()
        ft.sleep(seconds)

    gov = Governor(ENDPOINT, clock=ft.clock, sleep=sleep, rng=random.Random(1))
    holder.append(gov)
    for _ in range(5):
        gov.call(failing([Throttled("slow"), Unavailable("blip")]))
    assert len(ft.sleeps) >= 10


# ---------------------------------------------------------------------------- circuit breaker


def test_circuit_opens_fails_fast_and_a_half_open_probe_closes_it() -> None:
    ft = FakeTime()
    gov = make(ft, failure_threshold=5, open_interval=5.0)
    down = failing([Unavailable("connection refused")] * 5)
    with pytest.raises(CircuitOpen) as err:  # the 5th consecutive Unavailable opens the circuit
        gov.call(down)
    assert down.calls == 5  # type: ignore[attr-defined]
    assert isinstance(err.value, Unavailable) and err.value.retryable
    assert gov.stats()["state"] == "open"
    assert gov.stats()["circuit_opens"] == 1

    # While open: fail fast, without calling the KMS, saying how long to wait.
    ft.advance(1.0)
    never = failing([])
    with pytest.raises(Unavailable) as fast:
        gov.call(never)
    assert str(fast.value).startswith("connection refused; ")
    assert f"circuit open for {ENDPOINT}" in str(fast.value)
    assert fast.value.retry_after == pytest.approx(4.0)
    assert never.calls == 0  # type: ignore[attr-defined]

    # After the open interval: half-open, one probe goes through; others still fail fast meanwhile.
    ft.advance(5.0)
    assert gov.stats()["state"] == "half_open"
    concurrent: list[BaseException] = []

    def probe() -> str:
        try:
            gov.call(never)
        except CircuitOpen as exc:
            concurrent.append(exc)
        return "probe ok"

    assert gov.call(probe) == "probe ok"
    assert len(concurrent) == 1 and never.calls == 0  # type: ignore[attr-defined]
    assert gov.stats()["state"] == "closed"
    assert gov.call(never) == "ok"


def test_failed_probe_reopens_for_longer_up_to_the_maximum() -> None:
    ft = FakeTime()
    gov = make(ft, failure_threshold=2, open_interval=5.0, max_open_interval=12.0)
    with pytest.raises(CircuitOpen):
        gov.call(failing([Unavailable("down")] * 2))
    intervals = []
    for _ in range(3):
        ft.advance(100.0)
        with pytest.raises(CircuitOpen) as err:
            gov.call(failing([Unavailable("still down")]))
        intervals.append(err.value.retry_after)
    assert intervals == [10.0, 12.0, 12.0]
    assert gov.stats()["circuit_opens"] == 4
    ft.advance(100.0)
    assert gov.call(lambda: "back") == "back"  # the probe succeeds: closed, interval reset
    with pytest.raises(CircuitOpen) as err:
        gov.call(failing([Unavailable("down")] * 2))
    assert err.value.retry_after == 5.0


def test_throttling_never_opens_the_circuit() -> None:
    ft = FakeTime()
    gov = make(ft, failure_threshold=3, max_attempts=50, max_time=1e9)
    gov.call(failing([Throttled("slow down")] * 12))
    assert gov.stats()["state"] == "closed"
    # Throttles in between reset the count of consecutive Unavailable answers.
    gov.call(
        failing([Unavailable("a"), Unavailable("b"), Throttled("c"), Unavailable("d"), Unavailable("e")])
    )
    assert gov.stats()["circuit_opens"] == 0


def test_unavailable_spread_beyond_the_window_does_not_open() -> None:
    ft = FakeTime()
    gov = make(ft, failure_threshold=3, failure_window=10.0, max_attempts=1)
    for _ in range(6):
        with pytest.raises(Unavailable):
            gov.call(failing([Unavailable("blip")]))
        ft.advance(6.0)
    assert gov.stats()["circuit_opens"] == 0


# ---------------------------------------------------------------------------- adaptive rate


def test_rate_is_cut_after_a_throttle_and_grows_back() -> None:
    ft = FakeTime()
    gov = make(ft)

    def request() -> None:
        ft.advance(0.01)  # 10 ms round trip: one caller sends 100 requests/s

    for _ in range(200):
        gov.call(request)
    assert gov.current_rate is None  # unbounded until the first throttle
    measured = gov.stats()["measured_rate"]
    assert 90 < measured < 110

    seen: list[float | None] = []

    def throttled_once() -> None:
        if not seen:
            seen.append(None)
            raise Throttled("slow down")
        seen.append(gov.current_rate)  # the rate that paced the retry, before any success

    gov.call(throttled_once)
    cut = seen[1]
    assert cut == pytest.approx(0.7 * measured, rel=0.03)

    # CUBIC: concave climb back towards the rate of the throttle (K = cbrt(w_max * 0.3 / 0.4) ~ 4.2 s),
    # then past it.
    rates: list[float] = []
    while ft.now < 8.0:
        gov.call(request)
        rate = gov.current_rate
        assert rate is not None
        rates.append(rate)
    assert rates[0] == pytest.approx(cut, rel=0.05)
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(rates))  # never shrinks
    assert rates[-1] > measured  # grew back past the rate that was throttled
    assert gov.stats()["rate_cuts"] == 1


def test_pacing_holds_callers_to_the_rate() -> None:
    ft = FakeTime()
    gov = make(ft)
    gov.call(failing([Throttled("slow down")]))
    rate = gov.current_rate
    assert rate is not None
    start = ft.now
    for _ in range(50):
        gov.call(lambda: None)  # instantaneous calls: only the limiter spaces them
    elapsed = ft.now - start
    assert elapsed >= 45 / (rate * 1.5)  # the limiter paced ~50 sends near the (growing) rate


def test_a_probe_that_gets_no_send_slot_in_time_frees_the_half_open_circuit() -> None:
    ft = FakeTime()
    # A throttle cuts the rate to its floor, 0.01/s: one slot every 100 s.
    gov = make(ft, beta=0.001, min_rate=0.01, failure_threshold=1, max_time=60.0)
    with pytest.raises(Throttled, match="client-side send rate"):  # its retry would wait 100 s
        gov.call(failing([Throttled("slow down")]))
    ft.advance(200.0)
    with pytest.raises(CircuitOpen):
        gov.call(failing([Unavailable("down")]))
    ft.advance(5.0)  # half-open, but the next send slot is ~95 s away: past the probe's time limit
    for _ in range(2):
        with pytest.raises(Throttled) as err:
            gov.call(lambda: "never sent")
        assert not isinstance(err.value, CircuitOpen)  # the first probe did not keep the circuit blocked
        assert err.value.retry_after is not None and err.value.retry_after > 60
    assert gov.stats()["gave_up"] == 3


def test_one_cut_per_congestion_event() -> None:
    """An attempt admitted before a cut that is throttled afterwards does not cut again."""
    ft = FakeTime()
    gov = make(ft)
    gov.call(failing([Throttled("first")]))  # rate now enforced
    cuts = gov.stats()["rate_cuts"]
    inner_done: list[object] = []

    def outer() -> None:
        if not inner_done:
            # While this attempt is in flight another one is throttled and cuts the rate ...
            inner_done.append(gov.call(failing([Throttled("inner")])))
            # ... so this attempt's own throttle, from before that cut, is the same event.
            raise Throttled("outer")

    gov.call(outer)
    s = gov.stats()
    assert s["rate_cuts"] == cuts + 1
    assert s["throttled"] == 3


# ---------------------------------------------------------------------------- asyncio


async def test_acall_retries_in_threads() -> None:
    ft = FakeTime()
    gov = make(ft)
    threads: set[int] = set()

    def fn() -> int:
        threads.add(threading.get_ident())
        if fn.calls < 2:  # type: ignore[attr-defined]
            fn.calls += 1  # type: ignore[attr-defined]
            raise Throttled("slow down")
        return 7

    fn.calls = 0  # type: ignore[attr-defined]
    assert await gov.acall(fn, op="unwrap") == 7
    assert threading.get_ident() not in threads
    assert gov.stats()["retries"] == 2


async def test_acall_many_tasks_share_one_governor() -> None:
    ft = FakeTime()
    gov = make(ft)
    lock = threading.Lock()
    served = [0]

    def fn() -> None:
        with lock:
            served[0] += 1
            if served[0] % 4 == 0:
                raise Throttled("every fourth")

    await asyncio.wait_for(asyncio.gather(*(gov.acall(fn) for _ in range(40))), timeout=30)
    s = gov.stats()
    assert s["successes"] == 40 and s["throttled"] == s["retries"] > 0


async def test_acall_non_retryable_passes_through() -> None:
    gov = make(FakeTime())
    with pytest.raises(NotFound):
        await gov.acall(failing([NotFound("gone")]))


# ---------------------------------------------------------------------------- registry


def test_registry_is_per_endpoint_and_resettable() -> None:
    reset_governors()
    a = governor_for("https://a")
    assert governor_for("https://a") is a
    assert governor_for("https://b") is not a
    reset_governors()
    assert governor_for("https://a") is not a
    reset_governors()


def test_stats_keys() -> None:
    s = make(FakeTime()).stats()
    for key in (
        "attempts",
        "successes",
        "throttled",
        "retries",
        "budget_exhausted",
        "circuit_opens",
        "current_rate",
        "state",
    ):
        assert key in s


# ---------------------------------------------------------------------------- load: 16 threads vs 50/s


class SimWorld:
    """Discrete-event time for real threads: exactly one runs at a time, and the simulated clock
    jumps to the earliest wake-up when the running one sleeps. Deterministic for a given seed."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()
        self._queue: list[tuple[float, int, threading.Event]] = []
        self._seq = 0
        self._done = threading.Event()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        wake = threading.Event()
        with self._lock:
            self._push(self.now + max(0.0, seconds), wake)
            self._dispatch()
        wake.wait()

    def run(self, bodies: list[Callable[[], None]], timeout: float) -> list[BaseException]:
        errors: list[BaseException] = []
        threads = []
        for body in bodies:
            start = threading.Event()
            self._push(0.0, start)

            def target(start: threading.Event = start, body: Callable[[], None] = body) -> None:
                start.wait()
                try:
                    body()
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    with self._lock:
                        self._dispatch()

            threads.append(threading.Thread(target=target, daemon=True))
        for t in threads:
            t.start()
        with self._lock:
            self._dispatch()
        assert self._done.wait(timeout), "simulation did not finish"
        for t in threads:
            t.join(timeout)
        return errors

    def _push(self, wake: float, event: threading.Event) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (wake, self._seq, event))

    def _dispatch(self) -> None:
        if self._queue:
            wake, _, event = heapq.heappop(self._queue)
            self.now = max(self.now, wake)
            event.set()
        else:
            self._done.set()


class RateLimitedServer:
    """A KMS with a token-bucket quota: ``rate`` requests/s, bucket of ``burst``; 10 ms round trip."""

    def __init__(self, world: SimWorld, rate: float, burst: float, latency: float = 0.01) -> None:
        self.world, self.rate, self.burst, self.latency = world, rate, burst, latency
        self.tokens, self.last = burst, 0.0
        self.accepted = 0
        self.throttled = 0

    def request(self) -> None:
        now = self.world.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        ok = self.tokens >= 1
        if ok:
            self.tokens -= 1
            self.accepted += 1
        else:
            self.throttled += 1
        self.world.sleep(self.latency)
        if not ok:
            raise Throttled("Rate exceeded")


@pytest.mark.parametrize("burst", [5, 50])
def test_sixteen_threads_settle_near_a_50_per_second_limit(burst: int) -> None:
    world = SimWorld()
    server = RateLimitedServer(world, rate=50, burst=burst)
    gov = Governor(ENDPOINT, clock=world.clock, sleep=world.sleep, rng=random.Random(2024))
    calls_per_thread = 100

    def worker() -> None:
        for _ in range(calls_per_thread):
            gov.call(server.request, op="rewrap")

    errors = world.run([worker] * 16, timeout=60)

    assert errors == []  # zero failures
    s = gov.stats()
    assert s["successes"] == server.accepted == 16 * calls_per_thread
    assert s["budget_exhausted"] == s["gave_up"] == 0
    goodput = s["successes"] / world.now  # simulated seconds
    assert goodput >= 0.9 * 50
    assert s["throttled"] / s["attempts"] < 0.05  # it settled below the limit rather than bouncing off it
    assert 35 <= (s["current_rate"] or 0) <= 65


def test_callers_queued_behind_a_slow_rate_fail_at_their_time_limit() -> None:
    world = SimWorld()
    server = RateLimitedServer(world, rate=1, burst=1)
    gov = Governor(
        ENDPOINT, clock=world.clock, sleep=world.sleep, rng=random.Random(7), max_time=2.0, min_rate=0.5
    )
    durations: list[float] = []

    def worker() -> None:
        start = world.clock()
        try:
            gov.call(server.request)
        finally:
            durations.append(world.clock() - start)

    errors = world.run([worker] * 16, timeout=60)
    assert errors and all(isinstance(e, Throttled) for e in errors)
    assert max(durations) <= 2.0 + 0.01 + 1e-9  # time limit plus one round trip
    assert server.accepted + len(errors) == 16


# ---------------------------------------------------------------------------- mutations: never twice


def test_a_lost_answer_to_a_mutation_is_not_resent() -> None:
    ft = FakeTime()
    gov = make(ft)
    rotate = failing([AnswerLost("read timeout: may have been applied")])
    with pytest.raises(AnswerLost, match="may have been applied"):
        gov.call(rotate, op="rotate key", idempotent=False)
    assert rotate.calls == 1  # type: ignore[attr-defined]
    s = gov.stats()
    assert (s["answers_lost"], s["retries"], s["unavailable"]) == (1, 0, 1)
    assert ft.sleeps == []


def test_a_lost_answer_to_a_read_is_resent() -> None:
    ft = FakeTime()
    gov = make(ft)
    read = failing([AnswerLost("read timeout")], result="key")
    assert gov.call(read, op="read key") == "key"  # idempotent is the default
    assert read.calls == 2  # type: ignore[attr-defined]
    assert gov.stats()["answers_lost"] == 0


@pytest.mark.parametrize(
    "not_applied",
    [Unavailable("connection refused"), Throttled("429", retry_after=0.5)],
    ids=["not-sent", "throttled"],
)
def test_a_mutation_is_resent_after_errors_that_prove_it_was_not_applied(not_applied: KmsError) -> None:
    ft = FakeTime()
    gov = make(ft)
    rotate = failing([not_applied], result="rotated")
    assert gov.call(rotate, op="rotate key", idempotent=False) == "rotated"
    assert rotate.calls == 2  # type: ignore[attr-defined]
    assert gov.stats()["answers_lost"] == 0


def test_a_non_retryable_answer_to_a_mutation_passes_through_once() -> None:
    ft = FakeTime()
    gov = make(ft)
    rotate = failing([NotFound("no such key")])
    with pytest.raises(NotFound):
        gov.call(rotate, idempotent=False)
    assert rotate.calls == 1  # type: ignore[attr-defined]


def test_a_lost_answer_that_opens_the_circuit_still_says_it_may_have_applied() -> None:
    ft = FakeTime()
    gov = make(ft, failure_threshold=1)
    with pytest.raises(CircuitOpen):  # a read: the failure that opens the circuit fails fast
        gov.call(failing([AnswerLost("reset")]), op="read key")
    ft.advance(60.0)
    assert gov.call(failing([]), op="probe") == "ok"  # the probe closes it again
    rotate = failing([AnswerLost("connection reset after sending")])
    with pytest.raises(AnswerLost) as lost:  # opens the circuit again, but is not a CircuitOpen
        gov.call(rotate, op="rotate key", idempotent=False)
    assert not isinstance(lost.value, CircuitOpen)
    assert gov.stats()["state"] == "open" and rotate.calls == 1  # type: ignore[attr-defined]


def test_async_calls_keep_mutations_single_too() -> None:
    ft = FakeTime()
    gov = make(ft)
    rotate = failing([AnswerLost("lost")])
    with pytest.raises(AnswerLost):
        asyncio.run(gov.acall(rotate, op="rotate key", idempotent=False))
    assert rotate.calls == 1  # type: ignore[attr-defined]
    again = failing([AnswerLost("lost")], result="read")
    assert asyncio.run(gov.acall(again, op="read key")) == "read"
    assert again.calls == 2  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- progress (heartbeats)


def test_progress_is_reported_before_every_attempt_and_during_long_waits() -> None:
    ft = FakeTime()
    gov = make(ft)
    events: list[str] = []
    attempts = itertools.count(1)

    def fn() -> str:
        events.append(f"attempt@{ft.now:.2f}")
        if next(attempts) < 3:  # throttled twice, each time with a long Retry-After
            raise Throttled("429", retry_after=25.0)
        return "ok"

    def beat() -> None:
        events.append(f"beat@{ft.now:.2f}")

    with reporting_progress(beat):
        assert gov.call(fn, op="rotate key", idempotent=False) == "ok"
    assert events[:2] == ["beat@0.00", "attempt@0.00"]
    beats = [float(e.split("@")[1]) for e in events if e.startswith("beat")]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) <= PROGRESS_STEP + 1e-9 and len(beats) >= 5
    # Every attempt is preceded by a beat at the same moment.
    for index, event in enumerate(events):
        if event.startswith("attempt"):
            assert events[index - 1] == "beat@" + event.split("@")[1]

    # Outside the block nothing is reported, and waits are single sleeps again.
    events.clear()
    ft.sleeps.clear()
    make(ft).call(failing([Unavailable("blip", retry_after=25.0)]), op="read")
    assert events == [] and ft.sleeps == [25.0]


def test_progress_is_reported_by_async_calls() -> None:
    ft = FakeTime()
    gov = make(ft)
    beats: list[float] = []

    async def run() -> str:
        with reporting_progress(lambda: beats.append(ft.now)):
            return await gov.acall(failing([Unavailable("blip", retry_after=25.0)]), op="read")

    assert asyncio.run(run()) == "ok"
    assert len(beats) >= 4 and max(b - a for a, b in itertools.pairwise(beats)) <= PROGRESS_STEP + 1e-9


def test_a_failing_progress_callback_fails_the_call_before_it_is_sent() -> None:
    ft = FakeTime()
    gov = make(ft)
    rotate = failing([])

    def cancelled() -> None:
        raise RuntimeError("activity cancelled")

    with reporting_progress(cancelled), pytest.raises(RuntimeError):
        gov.call(rotate, op="rotate key", idempotent=False)
    assert rotate.calls == 0  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- accounting, pass-through


def test_accounting_counts_attempts_throttles_and_waiting() -> None:
    ft = FakeTime()
    gov = make(ft)
    with accounting() as acc:
        gov.call(failing([Throttled("slow down"), Unavailable("503")]), op="wrap")
    assert (acc.requests, acc.throttled) == (3, 1)
    assert acc.waited == pytest.approx(sum(ft.sleeps)) and acc.waited > 0
    with accounting() as other:
        gov.call(lambda: 1)
    assert (other.requests, other.throttled) == (1, 0)  # a new block starts from zero
    gov.call(failing([Throttled("slow down")]))  # outside any block: nothing is counted, nothing breaks
    assert (acc.requests, other.requests) == (3, 1)


def test_accounting_is_per_thread() -> None:
    gov = Governor(ENDPOINT)
    counts: list[int] = []

    def worker(n: int) -> None:
        with accounting() as acc:
            for _ in range(n):
                gov.call(lambda: None)
        counts.append(acc.requests)

    threads = [threading.Thread(target=worker, args=(n,)) for n in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counts) == [3, 5]


def test_async_accounting() -> None:
    ft = FakeTime()
    gov = make(ft)

    async def main() -> tuple[int, int]:
        with accounting() as acc:
            await gov.acall(failing([Throttled("slow down")]), op="wrap")
        return acc.requests, acc.throttled

    assert asyncio.run(main()) == (2, 1)


def test_pass_through_sends_once_or_resends_at_once() -> None:
    once = PassThroughGovernor(ENDPOINT, attempts=1)
    with accounting() as acc, pytest.raises(Throttled):
        once.call(failing([Throttled("slow down")]))
    assert (acc.requests, acc.throttled, acc.waited) == (1, 1, 0.0)
    naive = PassThroughGovernor(ENDPOINT, attempts=10)
    fn = failing([Throttled("slow down")] * 4, result="done")
    with accounting() as acc:
        assert naive.call(fn) == "done"
    assert fn.calls == 5 and (acc.requests, acc.throttled, acc.waited) == (5, 4, 0.0)  # type: ignore[attr-defined]
    with accounting() as acc, pytest.raises(Throttled):
        naive.call(failing([Throttled("slow down")] * 20))
    assert acc.requests == 10
    s = naive.stats()
    assert (s["attempts"], s["successes"], s["throttled"], s["gave_up"], s["current_rate"]) == (
        15,
        1,
        14,
        1,
        None,
    )


def test_pass_through_never_resends_what_cannot_succeed_or_may_have_applied() -> None:
    naive = PassThroughGovernor(ENDPOINT, attempts=10)
    for error in (NotFound("no such key"), ValueError("bug")):
        fn = failing([error])
        with pytest.raises(type(error)):
            naive.call(fn)
        assert fn.calls == 1  # type: ignore[attr-defined]
    fn = failing([AnswerLost("reset after sending")])
    with pytest.raises(AnswerLost):
        naive.call(fn, idempotent=False)
    assert fn.calls == 1  # type: ignore[attr-defined]
    fn = failing([AnswerLost("reset after sending")])
    assert naive.call(fn, idempotent=True) == "ok" and fn.calls == 2  # type: ignore[attr-defined]


def test_pass_through_async_and_uncounted() -> None:
    quiet = PassThroughGovernor(ENDPOINT, attempts=3, counts=False)

    async def main() -> tuple[int, int]:
        with accounting() as acc:
            await quiet.acall(failing([Throttled("slow down")]))
        return acc.requests, acc.throttled

    assert asyncio.run(main()) == (0, 0)  # left to the SDK's hooks
    assert quiet.stats()["attempts"] == 2
