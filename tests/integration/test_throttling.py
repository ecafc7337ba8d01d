"""Acceptance: under throttling at 50 operations/s, 2,000 wraps from 16 concurrent callers end
with no failure on every backend (the governor owns retries; SDK retries are off).

The three backends are independent servers, each throttled on its own, so their loads run at
the same time (one module fixture, a thread per backend; ~45 s instead of ~130 s one after the
other); each backend's test then judges its own run. Goodput is measured by
loadtest/bench_throttle.py, not asserted here: tests do not time things.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from kms_adapters.governor import Governor
from loadtest.throttled import THROTTLED, LoadResult, run_load, unique_name

pytestmark = pytest.mark.integration

LIMIT = 50
WRAPS = 2000
CALLERS = 16


@dataclass(frozen=True)
class Run:
    result: LoadResult
    throttled: int
    retries: int


def _load(backend: str) -> Run:
    with THROTTLED[backend](LIMIT) as throttled:
        governor = Governor(unique_name(f"throttle-{backend}"))
        adapter = throttled.adapter(unique_name("throttled"), governor)
        dek = os.urandom(32)
        result = run_load(lambda: adapter.wrap(dek), ops=WRAPS, callers=CALLERS, max_seconds=240)
        stats = governor.stats()
    return Run(result, stats["throttled"], stats["retries"])


@pytest.fixture(scope="module")
def runs() -> dict[str, Run | BaseException]:
    """Every backend's run, started together; a backend whose set-up failed holds its error."""
    with ThreadPoolExecutor(len(THROTTLED), thread_name_prefix="throttled-load") as pool:
        futures = {backend: pool.submit(_load, backend) for backend in sorted(THROTTLED)}
        outcomes: dict[str, Run | BaseException] = {}
        for backend, future in futures.items():
            error = future.exception()
            outcomes[backend] = error if error is not None else future.result()
    return outcomes


@pytest.mark.parametrize("backend", sorted(THROTTLED))
def test_2000_wraps_under_throttling_do_not_fail(backend: str, runs: dict[str, Run | BaseException]) -> None:
    run = runs[backend]
    if isinstance(run, BaseException):
        raise run
    result = run.result
    print(
        f"{backend}: {result.successes}/{WRAPS} in {result.elapsed:.1f}s, goodput {result.goodput:.1f}/s"
        f" ({result.goodput / LIMIT:.0%} of {LIMIT}/s), throttled {run.throttled}, retries {run.retries}"
    )
    assert result.failures == 0, dict(result.errors)
    assert result.successes == WRAPS
    assert run.throttled > 0  # the backend really throttled: the run proves the governor handled it
