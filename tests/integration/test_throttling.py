"""Acceptance: under throttling at 50 operations/s, 2,000 wraps from 16 concurrent callers end
with no failure on every backend (the governor owns retries; SDK retries are off). That takes
40 s at the limit, so `make test` runs 600 wraps (the same load, 12 s at the limit: the
governor's pacing settles in the first second) and `make soak` the full 2,000
(``THROTTLE_WRAPS=2000``, set by the soak test below).

The three backends are independent servers, each throttled on its own, so their loads run at
the same time (one module fixture, a thread per backend; ~45 s instead of ~130 s one after the
other); each backend's test then judges its own run. Goodput is measured by
loadtest/bench_throttle.py, not asserted here: tests do not time things.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from kms_adapters.governor import Governor
from loadtest.throttled import THROTTLED, LoadResult, run_load, unique_name

pytestmark = pytest.mark.integration

LIMIT = 50
WRAPS = int(os.environ.get("THROTTLE_WRAPS", "600"))
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
def test_wraps_under_throttling_do_not_fail(backend: str, runs: dict[str, Run | BaseException]) -> None:
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


@pytest.mark.soak
def test_2000_wraps_under_throttling_do_not_fail_on_any_backend() -> None:
    """The acceptance figure itself, in its own process (``make soak``)."""
    env = dict(os.environ, THROTTLE_WRAPS="2000")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not soak",
            "-m",
            "not soak",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
