"""Per-endpoint throttling governor: the one owner of retries for every KMS call.

Every adapter sends each KMS request as ``governor_for(endpoint).call(fn, op=...)`` (or
``await ...acall(fn, op=...)``, which runs ``fn`` in a thread). One ``Governor`` per endpoint is
shared by all threads and asyncio tasks of the worker process; SDK retries are off, so the
governor is the only place where a request is repeated. It combines four mechanisms:

**Adaptive send rate (CUBIC, as in botocore's ``adaptive`` retry mode).** A client-side rate
limiter paces every attempt, first tries and retries alike. Until the endpoint throttles for the
first time it is not enforced (unbounded). On a throttle the rate is cut to ``beta`` (0.7) times
the measured send rate (or the limiter's own rate, if lower) and the rate at which we were
throttled is remembered as ``w_max``; on each success the rate follows the cubic curve
``C * (t - K)**3 + w_max`` with ``C`` = 0.4 and ``K = cbrt(w_max * (1 - beta) / C)``: a fast
concave climb back towards ``w_max``, a plateau near it, then a convex probe past it. The client
therefore spends most of its time just under the server's limit and sees a throttle only about
once per cycle (a few seconds), which is what keeps the throttled fraction small. CUBIC was
chosen over AIMD because its recovery does not depend on the response rate (AIMD's additive
step must be tuned to the limit: too small recovers slowly from a 10 000/s HSM, too large
oscillates around a 50/s one), and its plateau keeps goodput high.

Two refinements over botocore:

* One cut per congestion event. Each attempt is stamped with the limiter's generation when it
  reserves its send slot; a throttle cuts the rate only if its attempt was paced at the current
  generation. Throttles of requests that were already admitted at the old rate say nothing new,
  so a burst of them (16 threads throttled at once) costs one cut, not 0.7**16.
* The measured send rate is an exponentially weighted rate (time constant ``rate_window``,
  1 s) with a start-up bias correction (its span counted as at least 100 ms), so the first
  throttle is cut from a real estimate rather than from zero (botocore's 0.5 s buckets can read
  0 there and collapse to the minimum rate). A too-high first estimate costs little: each further
  cut needs just one more throttle of a request paced at the new rate. Growth is capped at
  ``max(2 * measured, w_max)``: an idle client does not "grow" towards an unbounded rate, yet
  after a pause it resumes at the last known-good level.
* Until a request paced at the new rate has succeeded, further throttles do not cut again:
  quotas count per interval (OpenBao per second), so requests sent at the new rate into the
  interval that was already exhausted fail too, and cutting for each collapsed the rate to half
  the limit against OpenBao (measured: 25/s goodput at a 50/s quota).
* When sends far outrun what the server accepts (over 1.5x the accepted rate, once a full
  window of successes has been seen), the cut starts from the accepted rate: an unpaced start
  of 16 callers converges in one cut instead of a cascade.

The limiter is a GCRA (virtual-scheduling token bucket, burst ``max(1, rate * burst_seconds)``,
50 ms worth): under the lock a caller reserves the next send slot, then sleeps until it without
holding any lock. Reservations are FIFO, so concurrent callers are paced fairly. A cut voids the
slots reserved at the old rate (their holders re-reserve) and starts the new rate with an empty
bucket, the first slot one interval after the throttle: right after a throttle the server's
bucket is empty too, and a request sent at once would be throttled again and cut the rate twice.
A caller whose slot would lie beyond its call's time limit gets ``Throttled`` at once instead of
queueing past its deadline. The rate never falls below ``min_rate`` (0.5/s).

**Decorrelated-jitter backoff** between attempts of one call:
``sleep = min(cap, uniform(base, 3 * previous))`` (base 50 ms, cap 5 s), and at least the
error's ``retry_after`` when the server gave one.

**Retry budget.** An endpoint-wide token bucket (capacity 500, starts full): each success
deposits 0.1, each retry spends 1. With the budget empty a retryable error goes straight to the
caller, so retries cannot amplify an outage beyond ~10 % extra load once the start-up
allowance is spent. 500 covers the throttles of an unpaced start (16 callers against a 50/s OpenBao quota
spent ~160 before the rate settled); outages are bounded sooner by the circuit breaker. Per
call there is also a maximum number of attempts (20) and a maximum total time (60 s); then the
last error is raised.

**Circuit breaker.** ``failure_threshold`` (5) consecutive ``Unavailable`` answers within
``failure_window`` (10 s) open the circuit; ``Throttled`` does not count (a throttling server is
alive) and any other answer from the server resets the count. While open every call fails fast
with ``CircuitOpen`` (an ``Unavailable``) whose ``retry_after`` is the remaining open time. After
the open interval (5 s, doubling on each failed probe up to 60 s) the circuit is half-open and
lets one probe through; a probe that reaches the server (success, throttle, or a non-retryable
answer) closes it, an ``Unavailable`` re-opens it.

Non-retryable errors (a ``KmsError`` with ``retryable`` False, or any other exception) pass
through at once and do not touch the rate or the budget.

**Mutations are never sent twice.** A call made with ``idempotent=False`` (rotate, create,
disable, enable, destroy, set a release policy) is resent only after an error that proves the
request was not applied: ``Throttled`` (the server refused it for rate) and a plain
``Unavailable`` (adapters raise it only when nothing was sent: connection refused, DNS, a failed
TLS handshake). After ``AnswerLost`` (a read timeout, a connection reset or closed after
sending, a 5xx) the request may have been applied, so the governor raises it to the caller, who
reads the key's state to learn what happened; it counts in the circuit breaker like any
``Unavailable`` but never becomes a ``CircuitOpen`` (which would hide that it may have applied).

**Progress.** ``reporting_progress(callback)`` (a context manager, per thread and asyncio task)
makes every governed call of that context call ``callback()`` before each attempt and at least
every ``PROGRESS_STEP`` seconds while it waits (pacing, backoff): a Temporal activity passes
``activity.heartbeat`` so that its heartbeats are never further apart than one attempt (the SDK's
connect plus read timeout) or ``PROGRESS_STEP``, however long the governor keeps retrying.

**Accounting.** Every attempt, throttle and wait is reported to ``kms_adapters.accounting``
(``with accounting() as acc:`` counts what the governed calls of a block cost; the stress harness
records it per operation). ``PassThroughGovernor(..., counts=False)`` leaves the counting to an
adapter's SDK hooks (``sdk_retries=True``) so that nothing is counted twice.

**Other strategies, for comparison.** ``PassThroughGovernor`` has the same surface and none of
the mechanisms: ``attempts=1`` sends each call once (the SDK's own retries, if the adapter turned
them on, are then the only ones: the "sdk-default" strategy of ``rekey stress run``);
``attempts=10`` resends a retryable error at once, without backoff or pacing, up to 10 times (the
"naive" client). They exist to be measured against; nothing else in rekey uses them.

``Governor.snapshot()`` returns the counters and state as a typed ``GovernorStats`` (``stats()``
is the same as a dict, for reports). Every adapter exposes its governor as ``adapter.governor``
(``KmsAdapter.governor``), so callers read the counters without reaching into the adapter.

Clock, sleep and random source are injectable (``clock=``, ``sleep=``, ``async_sleep=``,
``rng=``) for deterministic tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeVar

from kms_adapters.accounting import record_attempt, record_throttle, record_wait
from kms_adapters.errors import AnswerLost, KmsError, Throttled, Unavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

CircuitState = Literal["closed", "open", "half_open"]
CLOSED: CircuitState = "closed"
OPEN: CircuitState = "open"
HALF_OPEN: CircuitState = "half_open"

PROGRESS_STEP = 10.0
"""Longest wait (pacing, backoff) between two progress callbacks of a governed call, seconds."""

_progress: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "kms_governor_progress", default=None
)


@contextlib.contextmanager
def reporting_progress(callback: Callable[[], None]) -> Iterator[None]:
    """Within this block, every governed call of this thread (or asyncio task) calls
    ``callback()`` before each attempt and at least every ``PROGRESS_STEP`` seconds of waiting."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


def _report_progress() -> None:
    callback = _progress.get()
    if callback is not None:
        callback()


class CircuitOpen(Unavailable):
    """The endpoint's circuit is open: the governor failed the call without sending it."""


class _RateMeter:
    """Exponentially weighted event rate (events per second) with start-up bias correction.

    A steady rate r observed for s seconds gives exactly r, also while s is still small
    compared with the time constant (like Adam's bias correction). ``min_span`` bounds the
    estimate of a burst that arrived all at once.
    """

    def __init__(self, tau: float, min_span: float) -> None:
        self._tau = tau
        self._min_span = min_span
        self._value = 0.0
        self._first: float | None = None
        self._last = 0.0

    def record(self, t: float) -> None:
        if self._first is None:
            self._first = t
            self._last = t
        dt = max(0.0, t - self._last)
        self._value = self._value * math.exp(-dt / self._tau) + 1.0 / self._tau
        self._last = max(self._last, t)

    def span(self, now: float) -> float:
        """How long this meter has been observing."""
        return 0.0 if self._first is None else now - self._first

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        decayed = self._value * math.exp(-max(0.0, now - self._last) / self._tau)
        span = max(now - self._first, self._min_span)
        return decayed / (1.0 - math.exp(-span / self._tau))


@dataclass
class _CallState:
    start: float
    attempts: int = 0
    previous_sleep: float = 0.0
    generation: int = 0
    reserved: bool = False
    probe: bool = False
    last_error: BaseException | None = None


@dataclass(frozen=True)
class GovernorStats:
    """One endpoint's counters (monotonic since the governor was made) and its current state."""

    endpoint: str
    attempts: int
    successes: int
    throttled: int  # attempts the server refused for rate
    unavailable: int
    retries: int
    budget_exhausted: int
    gave_up: int
    circuit_opens: int
    fast_failed: int
    rate_cuts: int
    answers_lost: int  # non-idempotent calls given back unsent after a possibly applied attempt
    current_rate: float | None  # the enforced send rate, None while unbounded
    measured_rate: float
    retry_budget: float
    state: CircuitState


class Governor:
    """Adaptive rate, retries with decorrelated jitter, retry budget and circuit breaker for one endpoint."""

    def __init__(
        self,
        endpoint: str,
        *,
        beta: float = 0.7,
        scale_constant: float = 0.4,
        min_rate: float = 0.5,
        burst_seconds: float = 0.05,
        rate_window: float = 1.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        budget_capacity: float = 500.0,
        budget_deposit: float = 0.1,
        budget_retry_cost: float = 1.0,
        max_attempts: int = 20,
        max_time: float = 60.0,
        failure_threshold: int = 5,
        failure_window: float = 10.0,
        open_interval: float = 5.0,
        max_open_interval: float = 60.0,
        half_open_retry_after: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        async_sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < beta < 1:
            raise ValueError("beta must be in (0, 1)")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.endpoint = endpoint
        self._beta = beta
        self._c = scale_constant
        self._min_rate = min_rate
        self._burst_seconds = burst_seconds
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._budget_capacity = budget_capacity
        self._budget_deposit = budget_deposit
        self._budget_retry_cost = budget_retry_cost
        self._max_attempts = max_attempts
        self._max_time = max_time
        self._failure_threshold = failure_threshold
        self._failure_window = failure_window
        self._open_base = open_interval
        self._open_max = max_open_interval
        self._half_open_retry_after = half_open_retry_after
        self._clock = clock
        self._sleep = sleep if sleep is not None else time.sleep
        if async_sleep is not None:
            self._async_sleep = async_sleep
        elif sleep is not None:
            self._async_sleep = _wrap_sync_sleep(sleep)
        else:
            self._async_sleep = asyncio.sleep
        self._rng = rng if rng is not None else random.Random()  # backoff jitter, not a secret  # nosec B311

        self._lock = threading.Lock()
        # Rate limiter (GCRA) and CUBIC state.
        self._enforced = False
        self._rate = math.inf
        self._tat = 0.0
        self._generation = 0
        self._w_max = 0.0
        self._k = 0.0
        self._last_cut = 0.0
        self._meter = _RateMeter(rate_window, min_span=0.1 * rate_window)
        self._success_since_cut = True
        # Trusted only after a full window (see _on_throttle): the first successes come from the
        # server's burst allowance and say little about its sustained rate.
        self._served_meter = _RateMeter(rate_window, min_span=0.1 * rate_window)
        self._rate_window = rate_window
        # Retry budget.
        self._budget = budget_capacity
        # Circuit breaker.
        self._state = CLOSED
        self._last_failure = ""
        self._failures: deque[float] = deque()
        self._open_until = 0.0
        self._open_for = open_interval
        self._probe_in_flight = False
        # Counters.
        self._attempts = 0
        self._successes = 0
        self._throttled = 0
        self._unavailable = 0
        self._retries = 0
        self._budget_exhausted = 0
        self._gave_up = 0
        self._circuit_opens = 0
        self._fast_failed = 0
        self._rate_cuts = 0
        self._answers_lost = 0

    # ------------------------------------------------------------------ public API

    def call(self, fn: Callable[[], T], *, op: str = "", idempotent: bool = True) -> T:
        """Run ``fn`` under the endpoint's rate limit, retrying retryable ``KmsError``s.

        ``idempotent=False`` for a mutation that must not be applied twice: it is resent only
        after errors that prove it was not applied (see the module docstring); ``AnswerLost``
        goes straight to the caller."""
        st = _CallState(start=self._clock())
        while True:
            self._admit(st)
            try:
                while (wait := self._pace(st)) > 0:
                    self._wait(wait)
                _report_progress()
            except BaseException:
                self._abandon(st)
                raise
            record_attempt()
            try:
                result = fn()
            except BaseException as exc:
                if isinstance(exc, Throttled):
                    record_throttle()
                delay = self._after_error(st, exc, op, idempotent)
                if delay is None:
                    raise
                self._wait(delay)
                continue
            self._after_success(st)
            return result

    async def acall(self, fn: Callable[[], T], *, op: str = "", idempotent: bool = True) -> T:
        """Like ``call`` for asyncio: ``fn`` runs in a worker thread, waits are ``asyncio`` sleeps."""
        st = _CallState(start=self._clock())
        while True:
            self._admit(st)
            try:
                while (wait := self._pace(st)) > 0:
                    await self._await(wait)
                _report_progress()
            except BaseException:
                self._abandon(st)
                raise
            record_attempt()
            try:
                result = await asyncio.to_thread(fn)
            except BaseException as exc:
                if isinstance(exc, Throttled):
                    record_throttle()
                delay = self._after_error(st, exc, op, idempotent)
                if delay is None:
                    raise
                await self._await(delay)
                continue
            self._after_success(st)
            return result

    def _wait(self, seconds: float) -> None:
        """Sleep ``seconds``, reporting progress at least every ``PROGRESS_STEP`` if asked to."""
        record_wait(seconds)
        if _progress.get() is None:
            self._sleep(seconds)
            return
        while seconds > PROGRESS_STEP:
            self._sleep(PROGRESS_STEP)
            seconds -= PROGRESS_STEP
            _report_progress()
        self._sleep(seconds)

    async def _await(self, seconds: float) -> None:
        record_wait(seconds)
        if _progress.get() is None:
            await self._async_sleep(seconds)
            return
        while seconds > PROGRESS_STEP:
            await self._async_sleep(PROGRESS_STEP)
            seconds -= PROGRESS_STEP
            _report_progress()
        await self._async_sleep(seconds)

    @property
    def current_rate(self) -> float | None:
        """The enforced send rate (requests/s), or None while unbounded (no throttle seen yet)."""
        with self._lock:
            return self._rate if self._enforced else None

    def snapshot(self) -> GovernorStats:
        """The counters and state at this moment (one consistent reading)."""
        now = self._clock()
        with self._lock:
            state = self._state
            if state == OPEN and now >= self._open_until:
                state = HALF_OPEN
            return GovernorStats(
                endpoint=self.endpoint,
                attempts=self._attempts,
                successes=self._successes,
                throttled=self._throttled,
                unavailable=self._unavailable,
                retries=self._retries,
                budget_exhausted=self._budget_exhausted,
                gave_up=self._gave_up,
                circuit_opens=self._circuit_opens,
                fast_failed=self._fast_failed,
                rate_cuts=self._rate_cuts,
                answers_lost=self._answers_lost,
                current_rate=self._rate if self._enforced else None,
                measured_rate=self._meter.rate(now),
                retry_budget=self._budget,
                state=state,
            )

    def stats(self) -> dict[str, Any]:
        """``snapshot()`` as a dict (same keys as the fields), for JSON reports."""
        return asdict(self.snapshot())

    # ------------------------------------------------------------------ one attempt

    def _admit(self, st: _CallState) -> None:
        """Start an attempt: the circuit check (raises CircuitOpen to fail fast)."""
        now = self._clock()
        with self._lock:
            st.probe = self._circuit_admit(now, st)
            self._attempts += 1
            st.attempts += 1
            st.reserved = False

    def _pace(self, st: _CallState) -> float:
        """Reserve a send slot; returns how long to wait for it, 0 to send now.

        The caller sleeps (holding no lock) and asks again. A slot reserved before a rate cut is
        void: the caller re-reserves at the new rate, so a cut applies at once to every queued
        attempt, and every attempt is sent at the generation whose rate paced it. A slot beyond
        the call's time limit is not taken: the call fails with ``Throttled`` (its ``retry_after``
        the wait it would have had) instead of queueing past its deadline.
        """
        now = self._clock()
        with self._lock:
            if not (st.reserved and st.generation == self._generation):
                send_at = now
                if self._enforced:
                    tat = max(self._tat, now)
                    send_at = max(now, tat - self._tolerance())
                    if send_at - st.start > self._max_time:
                        self._gave_up += 1
                        raise Throttled(
                            f"client-side send rate for {self.endpoint} ({self._rate:.2f}/s) "
                            "leaves no slot within the call's time limit",
                            retry_after=send_at - now,
                        ) from st.last_error
                    self._tat = tat + 1.0 / self._rate
                st.reserved = True
                st.generation = self._generation
                if send_at > now:
                    return send_at - now
            self._meter.record(now)
            return 0.0

    def _abandon(self, st: _CallState) -> None:
        """The attempt was never sent (no slot in time, or cancelled while waiting for one)."""
        with self._lock:
            if st.probe and self._state == HALF_OPEN:
                self._probe_in_flight = False

    def _open_message(self, wait: float) -> str:
        """Why calls fail fast: the endpoint's last failure, so the operator sees the cause."""
        cause = f"{self._last_failure}; " if self._last_failure else ""
        return f"{cause}circuit open for {self.endpoint} (failing fast for {wait:.0f}s)"

    def _circuit_admit(self, now: float, st: _CallState) -> bool:
        """Under the lock. True if this attempt is the half-open probe; raises CircuitOpen to fail fast."""
        if self._state == OPEN:
            if now < self._open_until:
                self._fast_failed += 1
                raise CircuitOpen(
                    self._open_message(self._open_until - now), retry_after=self._open_until - now
                ) from (st.last_error)
            self._state = HALF_OPEN
            self._probe_in_flight = False
        if self._state == HALF_OPEN:
            if self._probe_in_flight:
                self._fast_failed += 1
                raise CircuitOpen(
                    self._open_message(self._half_open_retry_after), retry_after=self._half_open_retry_after
                ) from st.last_error
            self._probe_in_flight = True
            return True
        return False

    def _after_success(self, st: _CallState) -> None:
        now = self._clock()
        with self._lock:
            self._successes += 1
            self._served_meter.record(now)
            if st.generation == self._generation:  # sent at the current rate, after the last cut
                self._success_since_cut = True
            self._budget = min(self._budget_capacity, self._budget + self._budget_deposit)
            if st.probe:
                self._close_circuit()
            elif self._state == CLOSED:
                self._failures.clear()
            if self._enforced:
                measured = self._meter.rate(now)
                cubic = self._c * (now - self._last_cut - self._k) ** 3 + self._w_max
                ceiling = max(2.0 * measured, self._w_max)
                self._rate = max(self._min_rate, min(cubic, ceiling))

    def _after_error(self, st: _CallState, exc: BaseException, op: str, idempotent: bool) -> float | None:
        """Classify a failed attempt. Returns the backoff before the next attempt, None to re-raise
        ``exc``; raises ``CircuitOpen`` if this failure opened the circuit (except after a lost
        answer to a non-idempotent call: its caller must learn that it may have been applied)."""
        now = self._clock()
        st.last_error = exc
        with self._lock:
            reached_server = isinstance(exc, KmsError) and not isinstance(exc, Unavailable)
            if isinstance(exc, Unavailable):
                self._unavailable += 1
                if not isinstance(exc, CircuitOpen):
                    self._last_failure = str(exc)
                self._record_unavailable(now, st)
            elif reached_server:
                if st.probe:
                    self._close_circuit()
                elif self._state == CLOSED:
                    self._failures.clear()
            elif st.probe:
                self._probe_in_flight = False  # inconclusive: let another call probe

            if not isinstance(exc, KmsError) or not exc.retryable:
                return None
            if not idempotent and isinstance(exc, AnswerLost):
                self._answers_lost += 1
                log.info(
                    "%s %s: the answer was lost and the request may have been applied; not resent",
                    self.endpoint,
                    op or "call",
                )
                return None
            if isinstance(exc, Throttled):
                self._throttled += 1
                self._on_throttle(st.generation, now)
            if self._state != CLOSED:
                # This failure opened (or re-opened) the circuit: fail fast from here on.
                self._fast_failed += 1
                raise CircuitOpen(
                    self._open_message(max(0.0, self._open_until - now)),
                    retry_after=max(0.0, self._open_until - now),
                ) from exc

            if st.attempts >= self._max_attempts:
                self._gave_up += 1
                return None
            previous = max(st.previous_sleep, self._backoff_base)
            jitter = min(self._backoff_cap, self._rng.uniform(self._backoff_base, 3.0 * previous))
            st.previous_sleep = jitter
            retry_after = getattr(exc, "retry_after", None)
            delay = max(jitter, retry_after) if retry_after is not None else jitter
            if now + delay - st.start > self._max_time:
                self._gave_up += 1
                return None
            if self._budget < self._budget_retry_cost - 1e-9:  # tolerate 10 x 0.1 != 1.0
                self._budget_exhausted += 1
                return None
            self._budget -= self._budget_retry_cost
            self._retries += 1
        log.debug(
            "%s %s attempt %d failed (%s); retrying in %.3fs",
            self.endpoint,
            op or "call",
            st.attempts,
            type(exc).__name__,
            delay,
        )
        return delay

    # ------------------------------------------------------------------ rate (under the lock)

    def _on_throttle(self, generation: int, now: float) -> None:
        if generation != self._generation:
            return  # admitted before the last cut: same congestion event, already answered
        if self._enforced and not self._success_since_cut:
            # Quotas count per interval (OpenBao: per second): attempts paced at the new rate but
            # sent inside the interval that was already exhausted fail too. Until a success shows
            # the server has capacity again they are the same congestion event; cutting again
            # for each would collapse the rate.
            return
        self._success_since_cut = False
        measured = self._meter.rate(now)
        current = min(measured, self._rate) if self._enforced else measured
        served = self._served_meter.rate(now)
        if self._served_meter.span(now) >= self._rate_window and current > 1.5 * served:
            # Sends far outrun what the server accepts (an unpaced start against a full queue
            # of callers): what it accepted is the better estimate of its limit, so the rate
            # converges in one cut instead of a cascade of them. Near the limit the send rate
            # is the better estimate (the accepted rate lags behind it).
            current = served
        current = max(current, self._min_rate)
        self._w_max = current
        self._k = (self._w_max * (1.0 - self._beta) / self._c) ** (1.0 / 3.0)
        self._last_cut = now
        self._enforced = True
        self._generation += 1
        self._rate_cuts += 1
        self._rate = max(self._min_rate, current * self._beta)
        # The server's bucket is empty now, and so is ours: queued attempts re-reserve at the new
        # rate, the first one a full interval from now, with no burst credit carried over.
        self._tat = now + self._tolerance() + 1.0 / self._rate
        log.debug("%s throttled at %.2f/s; send rate now %.2f/s", self.endpoint, current, self._rate)

    def _tolerance(self) -> float:
        """GCRA burst tolerance: a bucket of max(1, rate * burst_seconds) tokens."""
        return (max(1.0, self._rate * self._burst_seconds) - 1.0) / self._rate

    # ------------------------------------------------------------------ circuit (under the lock)

    def _record_unavailable(self, now: float, st: _CallState) -> None:
        if st.probe:
            self._open_for = min(self._open_max, self._open_for * 2.0)
            self._open_circuit(now)
            return
        if self._state != CLOSED:
            return  # admitted before the circuit opened; the open interval already covers it
        self._failures.append(now)
        while self._failures and self._failures[0] < now - self._failure_window:
            self._failures.popleft()
        if len(self._failures) >= self._failure_threshold:
            self._open_for = self._open_base
            self._open_circuit(now)

    def _open_circuit(self, now: float) -> None:
        self._state = OPEN
        self._open_until = now + self._open_for
        self._probe_in_flight = False
        self._failures.clear()
        self._circuit_opens += 1
        log.warning("%s unavailable: circuit open for %.1fs", self.endpoint, self._open_for)

    def _close_circuit(self) -> None:
        if self._state != CLOSED:
            log.info("%s answered the probe: circuit closed", self.endpoint)
        self._state = CLOSED
        self._probe_in_flight = False
        self._open_for = self._open_base
        self._failures.clear()


def _wrap_sync_sleep(sleep: Callable[[float], None]) -> Callable[[float], Awaitable[None]]:
    async def _sleep(seconds: float) -> None:
        sleep(seconds)

    return _sleep


class PassThroughGovernor(Governor):
    """No pacing, no backoff, no budget, no circuit: each call is sent, and a retryable error is
    resent at once up to ``attempts`` times in all (1: never). For measuring the governor against
    (``rekey stress run --strategy sdk-default|naive``); the counters of ``snapshot()`` count
    attempts, successes, throttles and gave-ups the same way."""

    def __init__(self, endpoint: str, *, attempts: int = 1, counts: bool = True) -> None:
        """``counts=False`` leaves ``accounting()`` to the adapter's SDK hooks (``sdk_retries``)."""
        super().__init__(endpoint, max_attempts=attempts)
        self._pass_attempts = attempts
        self._counts = counts

    def call(self, fn: Callable[[], T], *, op: str = "", idempotent: bool = True) -> T:
        attempt = 0
        while True:
            attempt += 1
            self._count_attempt()
            try:
                result = fn()
            except BaseException as exc:
                if not self._resend(exc, attempt, idempotent):
                    raise
                continue
            with self._lock:
                self._successes += 1
            return result

    async def acall(self, fn: Callable[[], T], *, op: str = "", idempotent: bool = True) -> T:
        attempt = 0
        while True:
            attempt += 1
            self._count_attempt()
            try:
                result = await asyncio.to_thread(fn)
            except BaseException as exc:
                if not self._resend(exc, attempt, idempotent):
                    raise
                continue
            with self._lock:
                self._successes += 1
            return result

    def _count_attempt(self) -> None:
        if self._counts:
            record_attempt()
        with self._lock:
            self._attempts += 1
            self._meter.record(self._clock())

    def _resend(self, exc: BaseException, attempt: int, idempotent: bool) -> bool:
        """Count a failed attempt; True to send it again at once."""
        with self._lock:
            if isinstance(exc, Throttled):
                self._throttled += 1
                if self._counts:
                    record_throttle()
            elif isinstance(exc, Unavailable):
                self._unavailable += 1
            if not isinstance(exc, KmsError) or not exc.retryable:
                return False
            if not idempotent and isinstance(exc, AnswerLost):
                self._answers_lost += 1
                return False
            if attempt >= self._pass_attempts:
                self._gave_up += 1
                return False
            self._retries += 1
            return True


_registry: dict[str, Governor] = {}
_lock = threading.Lock()


def governor_for(endpoint: str) -> Governor:
    """The process-wide governor of ``endpoint`` (created on first use, default settings)."""
    with _lock:
        gov = _registry.get(endpoint)
        if gov is None:
            gov = _registry[endpoint] = Governor(endpoint)
        return gov


def reset_governors() -> None:
    """Forget every governor (tests)."""
    with _lock:
        _registry.clear()
