"""What the KMS calls of one block of code cost: requests sent, throttles, time spent waiting.

``with accounting() as acc:`` (per thread and asyncio task: a context variable) counts every
governed call made in the block: ``acc.requests`` attempts sent, ``acc.throttled`` attempts
answered ``Throttled`` and ``acc.waited`` seconds slept pacing or backing off. The governors
(``kms_adapters.governor``) report each attempt; adapters whose SDK retries by itself
(``sdk_retries=True``) report each HTTP attempt with ``sdk_sent()`` / ``sdk_answered()`` from SDK
hooks. Outside a block every function here does nothing. The stress harness records the figures
per operation.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Accounting:
    """What the governed calls of one ``accounting()`` block cost (see the module docstring)."""

    requests: int = 0
    throttled: int = 0
    waited: float = 0.0
    last_answer: float | None = None
    """When the SDK last answered (``sdk_answered``): its sleep before a resend counts as waited."""


_accounting: contextvars.ContextVar[Accounting | None] = contextvars.ContextVar(
    "kms_governor_accounting", default=None
)


@contextlib.contextmanager
def accounting() -> Iterator[Accounting]:
    """Count the attempts, throttles and waiting of every governed call in this block (this
    thread or asyncio task only)."""
    acc = Accounting()
    token = _accounting.set(acc)
    try:
        yield acc
    finally:
        _accounting.reset(token)


def record_attempt() -> None:
    """One request sent, counted in the current ``accounting()`` block (if any)."""
    acc = _accounting.get()
    if acc is not None:
        acc.requests += 1


def record_throttle() -> None:
    """One request answered ``Throttled``, counted in the current ``accounting()`` block."""
    acc = _accounting.get()
    if acc is not None:
        acc.throttled += 1


def sdk_sent() -> None:
    """An SDK that retries by itself sends one HTTP request (call from its per-attempt hook).
    The time since its previous answer in this block is the SDK's backoff: counted as waited."""
    acc = _accounting.get()
    if acc is not None:
        acc.requests += 1
        if acc.last_answer is not None:
            acc.waited += max(0.0, time.monotonic() - acc.last_answer)
            acc.last_answer = None


def sdk_answered(*, throttled: bool) -> None:
    """The SDK's request got an HTTP answer (``throttled``: a 429 or throttling code)."""
    acc = _accounting.get()
    if acc is not None:
        if throttled:
            acc.throttled += 1
        acc.last_answer = time.monotonic()


def record_wait(seconds: float) -> None:
    """Seconds slept pacing or backing off, counted in the current ``accounting()`` block."""
    acc = _accounting.get()
    if acc is not None:
        acc.waited += seconds
