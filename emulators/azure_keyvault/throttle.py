"""The throttling model: a token bucket per operation class (capacity one second of the rate), HTTP
429 ``Throttled`` over the limit, and the counters behind ``GET /_emulator/stats``."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from typing import Any

from emulators.azure_keyvault.wire import ApiError

__all__ = ["DEFAULT_LIMITS", "Throttle", "TokenBucket"]

#: Requests per second per operation class. Documented Managed HSM figures: AES-256 operations
#: 9,000/s, RSA-2048 private-key operations 1,100/s, key creation 1/s; the rest are our choices.
DEFAULT_LIMITS: dict[str, float] = {
    "wrap": 9000.0,  # wrapKey/unwrapKey/encrypt/decrypt with an oct-HSM (AES) key
    "rsa2048": 1100.0,  # unwrapKey/decrypt with RSA-2048 (private-key operations)
    "rsa2048-public": 5000.0,  # wrapKey/encrypt with RSA-2048 done by the service
    "rsa3072": 500.0,
    "rsa3072-public": 2000.0,
    "rsa4096": 160.0,
    "rsa4096-public": 1000.0,
    "create": 1.0,  # create, rotate
    "release": 100.0,  # Secure Key Release
    "read": 1100.0,  # get key, list keys/versions/deleted keys, get rotation policy, rng
    "manage": 10.0,  # update, delete, purge, recover, set rotation policy
}


class TokenBucket:
    """Token bucket: ``rate`` tokens per second, capacity one second's worth (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, now: float) -> float:
        """0 if a token was taken, else the seconds until one is available."""
        if self.rate <= 0 or math.isinf(self.rate):
            return 0.0
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Throttle:
    """The limits per class, their buckets, and the emulator's traffic counters (one lock for all,
    so a stats snapshot is consistent)."""

    def __init__(
        self, limits: Mapping[str, float], *, rate_scale: float = 1.0, retry_after: bool = True
    ) -> None:
        #: Send ``Retry-After`` (whole seconds, at least 1) with a 429.
        self.retry_after = retry_after
        self._rate_scale = rate_scale
        self._lock = threading.Lock()
        self._limits: dict[str, float] = {}
        self._buckets: dict[str, TokenBucket] = {}
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
            if reset:
                self._limits = {name: rate * self._rate_scale for name, rate in DEFAULT_LIMITS.items()}
            for name, rate in limits.items():
                self._limits[name] = float(rate) if rate > 0 else math.inf
            self._buckets = {name: TokenBucket(rate) for name, rate in self._limits.items()}
            for name in self._limits:
                self._served.setdefault(name, 0)
                self._throttled.setdefault(name, 0)

    @property
    def limits(self) -> dict[str, float]:
        with self._lock:
            return dict(self._limits)

    def take(self, klass: str) -> None:
        """Count one request of ``klass`` as served, or raise the 429 answer if over its limit."""
        with self._lock:
            bucket = self._buckets.get(klass)
            wait = bucket.take(time.monotonic()) if bucket is not None else 0.0
            if wait <= 0:
                self._served[klass] = self._served.get(klass, 0) + 1
                return
            self._throttled[klass] = self._throttled.get(klass, 0) + 1
            limit = self._limits[klass]
        headers = {"Retry-After": str(max(1, math.ceil(wait)))} if self.retry_after else {}
        raise ApiError(
            429,
            "Throttled",
            f"Request was not processed because too many requests were received. "
            f"Reason: the {klass} limit of {limit:g} requests per second is exceeded.",
            headers=headers,
        )

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
            classes = {
                name: {
                    "limit": None if math.isinf(rate) else rate,
                    "served": self._served.get(name, 0),
                    "throttled": self._throttled.get(name, 0),
                }
                for name, rate in self._limits.items()
            }
            return {
                "retry_after": self.retry_after,
                "classes": classes,
                "unauthorized": self._unauthorized,
                "requests": self._requests,
                "statuses": dict(self._statuses),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._served = dict.fromkeys(self._limits, 0)
            self._throttled = dict.fromkeys(self._limits, 0)
            self._unauthorized = 0
            self._requests = 0
            self._statuses = {}
