"""The throttling model: a token bucket per operation class (capacity one second of the rate), HTTP
429 ``Throttled`` over the limit, the optional sustained-load model, and the counters behind
``GET /_emulator/stats``.

Sustained-load model (:class:`SustainedLoad`): the emulator measures the rate it *receives* per class
(throttled requests included) over a sliding one-second window, evaluated every
:data:`WINDOW_STEP` seconds. When that rate stays above ``share`` x the class limit for ``after``
seconds, the class is *degraded*: its limit drops to ``drop`` x the limit and every answer of the
class is delayed by ``latency_step`` for each second (begun) it has been degraded, at most
``latency_cap``. It returns to normal once the received rate has stayed below ``recover_share`` x
the normal limit for ``recover_after`` seconds. The delay is served by the request's own thread
after its answer is computed, holding no lock (see :meth:`Throttle.answer_delay`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from emulators.azure_keyvault.wire import ApiError

__all__ = [
    "CRYPTO_CLASSES",
    "DEFAULT_LIMITS",
    "WINDOW_STEP",
    "SustainedLoad",
    "Throttle",
    "TokenBucket",
    "managed_hsm_limits",
]

#: Requests per second per operation class: Managed HSM's documented throughput per HSM instance
#: (Microsoft, "Azure Managed HSM Scaling Guidance", 2023-05-16: single-partition figures, the ones
#: to plan with for a guaranteed rate; up to 3x with all three partitions). One class can only have
#: one limit, so a class takes the lowest figure of the operations it groups (AES-256: wrap 2,100,
#: unwrap 2,200, encrypt 2,200, decrypt 3,200). ``release`` is our choice (no figure is published).
#: Microsoft's earlier service-limits table had higher figures (AES wrap/unwrap 9,000/s, RSA-2048
#: wrap 10,000/s); see docs/azure-keyvault-emulator.md.
DEFAULT_LIMITS: dict[str, float] = {
    "wrap": 2100.0,  # wrapKey/unwrapKey/encrypt/decrypt with an oct-HSM (AES) key
    "rsa2048": 1100.0,  # unwrapKey/decrypt with RSA-2048 (private-key operations)
    "rsa2048-public": 2200.0,  # wrapKey/encrypt with RSA-2048 done by the service (wrap 2,200, encrypt 2,800)
    "rsa3072": 360.0,
    "rsa3072-public": 1900.0,  # wrap 1,900, encrypt 2,700
    "rsa4096": 160.0,
    "rsa4096-public": 1900.0,  # wrap 1,900, encrypt 2,300
    "create": 1.0,  # create key, rotate
    "release": 100.0,  # Secure Key Release (our choice)
    "read": 1100.0,  # get key information; also list keys/versions/deleted keys, rotation policy, rng
    "manage": 10.0,  # delete (soft), purge, backup, restore; also update, recover, set rotation policy
}

#: The classes of cryptographic operations: a profile's throttle rate scales these together.
CRYPTO_CLASSES: tuple[str, ...] = (
    "wrap",
    "rsa2048",
    "rsa2048-public",
    "rsa3072",
    "rsa3072-public",
    "rsa4096",
    "rsa4096-public",
)

#: The sliding window advances in steps of this many seconds (10 steps make the 1 s window).
WINDOW_STEP = 0.1
_STEPS = 10


def managed_hsm_limits(rate: float | None = None) -> dict[str, float]:
    """Managed HSM's limits with the cryptographic classes scaled so that ``wrap`` is ``rate``
    (None: the documented 2,100/s); ``create``, ``release``, ``read`` and ``manage`` stay as
    documented."""
    limits = dict(DEFAULT_LIMITS)
    if rate is None:
        return limits
    if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
        raise ValueError(f"the throttle rate must be a positive number of requests/s, not {rate!r}")
    factor = float(rate) / DEFAULT_LIMITS["wrap"]
    for name in CRYPTO_CLASSES:
        limits[name] = DEFAULT_LIMITS[name] * factor
    limits["wrap"] = float(rate)  # exactly, not up to rounding
    return limits


@dataclass(frozen=True)
class SustainedLoad:
    """Parameters of the sustained-load model (seconds; shares of the class's normal limit).

    The defaults are "compressed to seconds": a client pacing itself near the limit (received rate
    about 1.0-1.1 x) never degrades a class, one that retries at once on every 429 (several times
    the limit) does within ``after`` seconds.
    """

    share: float = 1.5  # degrade when the received rate stays above share x limit ...
    after: float = 10.0  # ... for this long
    drop: float = 0.3  # degraded limit = drop x limit
    latency_step: float = 0.05  # added to every answer per second (begun) degraded ...
    latency_cap: float = 2.0  # ... up to this
    recover_share: float = 1.0  # normal again when the received rate stays below recover_share x limit ...
    recover_after: float = 5.0  # ... for this long

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"sustained-load {item.name} must be a finite number, not {value!r}")
            object.__setattr__(self, item.name, float(value))
        if self.share <= 0 or self.recover_share <= 0:
            raise ValueError("sustained-load share and recover_share must be > 0")
        if not 0 < self.drop <= 1:
            raise ValueError(f"sustained-load drop must be in (0, 1], not {self.drop:g}")
        for name in ("after", "latency_step", "latency_cap", "recover_after"):
            if getattr(self, name) < 0:
                raise ValueError(f"sustained-load {name} must be >= 0, not {getattr(self, name):g}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SustainedLoad:
        """From a JSON object / keyword mapping; unknown names are refused."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown sustained-load parameters: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**dict(values))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def latency(self, degraded_for: float) -> float:
        """The delay added to an answer after ``degraded_for`` seconds degraded."""
        return min(self.latency_cap, self.latency_step * (math.floor(max(0.0, degraded_for)) + 1))


class TokenBucket:
    """Token bucket: ``rate`` tokens per second, capacity one second's worth (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate, keeping the tokens earned so far (at most the new capacity)."""
        self.take_nothing(now)
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = min(self.tokens, self.capacity)

    def take_nothing(self, now: float) -> None:
        if self.rate > 0 and not math.isinf(self.rate):
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        if self.rate <= 0 or math.isinf(self.rate):
            return 0.0
        self.take_nothing(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _ClassLoad:
    """The received rate of one class over a sliding 1 s window (10 steps of 0.1 s) and the
    sustained-load state machine fed by it."""

    __slots__ = ("above_since", "below_since", "count", "degradations", "degraded_since", "step", "window")

    def __init__(self, now: float) -> None:
        self.step = math.floor(now / WINDOW_STEP)  # the step being counted
        self.count = 0  # requests received in that step
        self.window: deque[int] = deque([0] * _STEPS, maxlen=_STEPS)  # the last complete steps
        self.above_since: float | None = None
        self.below_since: float | None = None
        self.degraded_since: float | None = None  # monotonic
        self.degradations = 0

    @property
    def rate(self) -> float:
        """Requests received in the last complete second (the window of 10 complete steps)."""
        return float(sum(self.window))

    def advance(self, now: float, limit: float, model: SustainedLoad | None) -> bool:
        """Close the steps that ended before ``now``, evaluating the model at each step's end;
        True if the class became degraded or recovered."""
        current = math.floor(now / WINDOW_STEP)
        changed = False
        while self.step < current:
            self.window.append(self.count)
            self.count = 0
            self.step += 1
            changed |= self._evaluate(self.step * WINDOW_STEP, limit, model)
            if self.step < current and not any(self.window):
                # Nothing more arrived: the rate stays 0 until now, so one evaluation at the
                # last step boundary gives the same state as stepping through every one.
                self.step = current
                changed |= self._evaluate(current * WINDOW_STEP, limit, model)
        return changed

    def _evaluate(self, at: float, limit: float, model: SustainedLoad | None) -> bool:
        if model is None or math.isinf(limit):
            changed = self.degraded_since is not None
            self.above_since = self.below_since = self.degraded_since = None
            return changed
        rate = self.rate
        if self.degraded_since is None:
            if rate > model.share * limit:
                if self.above_since is None:
                    self.above_since = at
                if at - self.above_since >= model.after:
                    self.degraded_since = at
                    self.below_since = None
                    self.degradations += 1
                    return True
            else:
                self.above_since = None
            return False
        if rate < model.recover_share * limit:
            if self.below_since is None:
                self.below_since = at
            if at - self.below_since >= model.recover_after:
                self.degraded_since = self.above_since = self.below_since = None
                return True
        else:
            self.below_since = None
        return False


class Throttle:
    """The limits per class, their buckets, the sustained-load model and the emulator's traffic
    counters (one lock for all, so a stats snapshot is consistent; it is never held while an
    answer is delayed)."""

    def __init__(
        self,
        limits: Mapping[str, float],
        *,
        rate_scale: float = 1.0,
        retry_after: bool = True,
        sustained: SustainedLoad | None = None,
    ) -> None:
        #: Send ``Retry-After`` (whole seconds, at least 1) with a 429.
        self.retry_after = retry_after
        self._rate_scale = rate_scale
        self._lock = threading.Lock()
        self._local = threading.local()
        self._sustained = sustained
        self._limits: dict[str, float] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._loads: dict[str, _ClassLoad] = {}
        self._served: dict[str, int] = {}
        self._throttled: dict[str, int] = {}
        self._unauthorized = 0
        self._requests = 0
        self._statuses: dict[str, int] = {}
        self.set_limits(limits, reset=True)

    def set_limits(self, limits: Mapping[str, float], *, reset: bool = False) -> None:
        """Override the limits of some classes (requests/s; 0 or less = unlimited). ``reset``
        first restores the defaults times ``rate_scale``."""
        unknown = sorted(set(limits) - set(DEFAULT_LIMITS))
        if unknown:
            raise ValueError(
                f"unknown throttling classes: {', '.join(unknown)} (known: {', '.join(DEFAULT_LIMITS)})"
            )
        with self._lock:
            now = time.monotonic()
            if reset:
                self._limits = {name: rate * self._rate_scale for name, rate in DEFAULT_LIMITS.items()}
            for name, rate in limits.items():
                self._limits[name] = float(rate) if rate > 0 else math.inf
            for name in self._limits:
                self._loads.setdefault(name, _ClassLoad(now))
                self._served.setdefault(name, 0)
                self._throttled.setdefault(name, 0)
            self._buckets = {name: TokenBucket(self._effective(name)) for name in self._limits}

    @property
    def limits(self) -> dict[str, float]:
        """The normal limits (a degraded class's current limit is in :meth:`stats`)."""
        with self._lock:
            return dict(self._limits)

    @property
    def sustained(self) -> SustainedLoad | None:
        return self._sustained

    def set_sustained(self, model: SustainedLoad | None) -> None:
        """Switch the sustained-load model on (with these parameters) or off (None: every class
        returns to normal at once)."""
        with self._lock:
            now = time.monotonic()
            self._sustained = model
            for name, load in self._loads.items():
                if model is None and load.degraded_since is not None:
                    load.degraded_since = load.above_since = load.below_since = None
                self._buckets[name].set_rate(self._effective(name), now)

    def _effective(self, name: str) -> float:
        """The current limit of a class: its normal limit, or ``drop`` x it while degraded."""
        limit = self._limits[name]
        load = self._loads.get(name)
        if self._sustained is not None and load is not None and load.degraded_since is not None:
            return limit * self._sustained.drop
        return limit

    def _advance(self, name: str, now: float) -> _ClassLoad:
        load = self._loads[name]
        if load.advance(now, self._limits[name], self._sustained):
            self._buckets[name].set_rate(self._effective(name), now)
        return load

    def take(self, klass: str) -> None:
        """Count one request of ``klass`` as served, or raise the 429 answer if over its limit.

        While the class is degraded, the delay its answer is owed is noted for this thread
        (:meth:`answer_delay`)."""
        with self._lock:
            now = time.monotonic()
            bucket = self._buckets.get(klass)
            if bucket is None:
                self._served[klass] = self._served.get(klass, 0) + 1
                return
            load = self._advance(klass, now)
            load.count += 1
            if load.degraded_since is not None and self._sustained is not None:
                delay = self._sustained.latency(now - load.degraded_since)
                self._local.delay = max(getattr(self._local, "delay", 0.0), delay)
            wait = bucket.take(now)
            if wait <= 0:
                self._served[klass] += 1
                return
            self._throttled[klass] += 1
            limit = bucket.rate
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if self.retry_after else {}
        raise ApiError(
            429,
            "Throttled",
            f"Request was not processed because too many requests were received. "
            f"Reason: the {klass} limit of {limit:g} requests per second is exceeded.",
            headers=headers,
        )

    def begin_answer(self) -> None:
        """A new request on this thread: it owes no delay yet."""
        self._local.delay = 0.0

    def answer_delay(self) -> float:
        """The seconds this thread's current answer is to be held back (the sustained-load
        latency of a degraded class), and forget it."""
        delay = float(getattr(self._local, "delay", 0.0))
        self._local.delay = 0.0
        return delay

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def count_unauthorized(self) -> None:
        with self._lock:
            self._unauthorized += 1

    def count_status(self, status: int) -> None:
        with self._lock:
            self._statuses[str(status)] = self._statuses.get(str(status), 0) + 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            now, wall = time.monotonic(), time.time()
            model = self._sustained
            classes: dict[str, dict[str, Any]] = {}
            for name, rate in self._limits.items():
                load = self._advance(name, now)
                current = self._effective(name)
                since = load.degraded_since
                degraded = since is not None and model is not None
                classes[name] = {
                    "limit": None if math.isinf(current) else current,
                    "normal_limit": None if math.isinf(rate) else rate,
                    "served": self._served.get(name, 0),
                    "throttled": self._throttled.get(name, 0),
                    "received_rate": load.rate,
                    "degraded": degraded,
                    "degraded_since": wall - (now - since) if degraded and since is not None else None,
                    "degraded_for": now - since if degraded and since is not None else None,
                    "latency_ms": (
                        model.latency(now - since) * 1000.0
                        if degraded and model is not None and since is not None
                        else 0.0
                    ),
                    "degradations": load.degradations,
                }
            return {
                "retry_after": self.retry_after,
                "sustained": model.to_dict() if model is not None else None,
                "degraded": sorted(name for name, c in classes.items() if c["degraded"]),
                "classes": classes,
                "unauthorized": self._unauthorized,
                "requests": self._requests,
                "statuses": dict(self._statuses),
            }

    def reset_stats(self) -> None:
        """Zero the counters (a degraded class stays degraded: that is the server's state)."""
        with self._lock:
            self._served = dict.fromkeys(self._limits, 0)
            self._throttled = dict.fromkeys(self._limits, 0)
            for load in self._loads.values():
                load.degradations = 0
            self._unauthorized = 0
            self._requests = 0
            self._statuses = {}
