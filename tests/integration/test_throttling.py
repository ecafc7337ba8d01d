"""Acceptance: under throttling at 50 operations/s, 2,000 wraps from 16 concurrent callers end
with no failure on every backend (the governor owns retries; SDK retries are off).

Goodput is measured by loadtest/bench_throttle.py, not asserted here: tests do not time things.
"""

from __future__ import annotations

import os

import pytest

from kms_adapters.governor import Governor
from loadtest.throttled import THROTTLED, run_load, unique_name

pytestmark = pytest.mark.integration

LIMIT = 50
WRAPS = 2000
CALLERS = 16


@pytest.mark.parametrize("backend", sorted(THROTTLED))
def test_2000_wraps_under_throttling_do_not_fail(backend: str) -> None:
    with THROTTLED[backend](LIMIT) as throttled:
        governor = Governor(unique_name(f"throttle-{backend}"))
        adapter = throttled.adapter(unique_name("throttled"), governor)
        dek = os.urandom(32)
        result = run_load(lambda: adapter.wrap(dek), ops=WRAPS, callers=CALLERS, max_seconds=240)
        stats = governor.stats()
    print(
        f"{backend}: {result.successes}/{WRAPS} in {result.elapsed:.1f}s, goodput {result.goodput:.1f}/s"
        f" ({result.goodput / LIMIT:.0%} of {LIMIT}/s), throttled {stats['throttled']},"
        f" retries {stats['retries']}"
    )
    assert result.failures == 0, dict(result.errors)
    assert result.successes == WRAPS
    assert stats["throttled"] > 0  # the backend really throttled: the run proves the governor handled it
