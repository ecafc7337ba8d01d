"""Benchmark: the governor against common retry strategies, on the same throttled backends, in one run.

Every backend is throttled at ``--limit`` operations/s the way ``loadtest/throttled.py`` sets it up
(OpenBao: its own rate-limit quota on the key's encrypt path; AWS: moto behind the throttling
proxy answering ``ThrottlingException``; Azure: the Key Vault emulator's ``wrap`` limit with
Retry-After off). Each strategy wraps a 32-byte DEK ``--ops`` times from ``--callers`` threads
(default 2,000 wraps, 16 callers, 50/s: about 40 s a run), on a fresh key, with the backend's
counters reset and ``--settle`` seconds of quiet before it so runs do not interfere.

Strategies:

``governor``
    The rekey adapter with a fresh ``Governor`` (SDK retries off): ``adapter.wrap(dek)``.
``capexp``
    The same adapter with a pass-through governor (each call sent once, no pacing, no budget,
    no circuit), in a loop: capped exponential backoff with full jitter; on ``Throttled`` or
    ``Unavailable`` sleep ``uniform(0, min(cap, base * 2**retry))`` (at least a Retry-After, had
    the server sent one), base 50 ms, cap 5 s, at most 10 attempts (the AWS architecture blog's
    formula; 10 attempts is azure-core's ``retry_total`` default).
``none`` (vault)
    The pass-through adapter, one attempt (the baseline "no retries").
``standard`` / ``adaptive`` (aws)
    A plain boto3 KMS client on the proxy (``Config(retries={"mode": m})``, the mode's default of
    3 attempts; ``max_pool_connections`` = callers, as for the adapter) sharing one client across
    the callers (so ``adaptive``'s client-side rate limiter and ``standard``'s retry quota are
    shared, as intended), calling ``encrypt(KeyId=<primary alias>, Plaintext=dek)``; a
    ``ClientError`` after the SDK gives up is a failure.
``azure-core`` (azure)
    The SDK's default retry policy (``retry_total`` not passed: 10 retries, backoff 0.8 s), calling
    ``wrap_key`` on the key's current version with the adapter's remote-only
    ``CryptographyClient``. (The stock ``CryptographyClient`` would not send the wrap at all: for an
    oct-HSM key it wraps locally with a random key; the run checks that once and says so.)
    azure-core does not retry a POST on 429 without Retry-After, so every throttled wrap fails.

hvac has no retry mode of its own, so vault has no SDK baseline.

Measured per (backend, strategy): goodput as a share of the limit (successes / elapsed / limit),
failed operations (and operations never started before the run's time bound), the share of
requests that were throttled, p50/p99 latency of successful operations and the elapsed time.
The throttled share is counted by the server where it can be: the proxy for AWS (every request
through it, including the adapter's DescribeKey refreshes), the emulator's ``wrap`` class for
Azure; for vault it is counted client-side (the governor's ``attempts``/``throttled`` and the
retry loop's own counts; for ``none`` every failure).

    python -m loadtest.bench_throttle [--ops 2000] [--callers 16] [--limit 50]
        [--backends vault,aws,azure] [--strategies governor,capexp,...] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar, cast

import boto3
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
from botocore.config import Config

from kms_adapters.azure_hsm import RemoteCryptographyClient, StaticTokenCredential
from kms_adapters.errors import Throttled, Unavailable
from kms_adapters.governor import Governor
from loadtest.throttled import MOTO_CREDENTIALS, THROTTLED, ThrottledBackend, run_load, unique_name

T = TypeVar("T")

STRATEGIES: dict[str, tuple[str, ...]] = {
    "vault": ("governor", "capexp", "none"),
    "aws": ("governor", "capexp", "standard", "adaptive"),
    "azure": ("governor", "capexp", "azure-core"),
}
LABELS = {
    "governor": "rekey governor",
    "capexp": "capped exp. + full jitter",
    "none": "no retries",
    "standard": "botocore standard",
    "adaptive": "botocore adaptive",
    "azure-core": "azure-core default",
}
NOTES = {
    "vault": "hvac has no retry mode of its own: no SDK baseline for OpenBao/Vault",
    "aws": "",
    "azure": "azure-core does not retry a POST (wrapKey) on 429 without Retry-After",
}
BACKOFF_BASE = 0.05
BACKOFF_CAP = 5.0
BACKOFF_ATTEMPTS = 10


# ----------------------------------------------------------------------------- strategies


class PassThrough:
    """Stands in for a ``Governor``: sends each call once, no pacing, retries, budget or circuit."""

    def call(self, fn: Callable[[], T], *, op: str = "") -> T:
        return fn()


class FullJitter:
    """Capped exponential backoff with full jitter, counting attempts and throttles (thread-safe)."""

    def __init__(self, *, base: float, cap: float, max_attempts: int, rng: random.Random) -> None:
        self.base, self.cap, self.max_attempts = base, cap, max_attempts
        self._rng = rng
        self._lock = threading.Lock()
        self.attempts = 0
        self.throttled = 0
        self.gave_up = 0

    def call(self, fn: Callable[[], T]) -> T:
        for retry in range(self.max_attempts):
            with self._lock:
                self.attempts += 1
            try:
                return fn()
            except (Throttled, Unavailable) as exc:
                with self._lock:
                    self.throttled += isinstance(exc, Throttled)
                    if retry == self.max_attempts - 1:
                        self.gave_up += 1
                        raise
                    delay = self._rng.uniform(0.0, min(self.cap, self.base * 2**retry))
                time.sleep(max(delay, exc.retry_after or 0.0))
        raise AssertionError("unreachable")


class Counting:
    """One attempt per call (the "no retries" baseline), counting attempts and throttles."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.attempts = 0
        self.throttled = 0

    def call(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self.attempts += 1
        try:
            return fn()
        except Throttled:
            with self._lock:
                self.throttled += 1
            raise


@dataclass
class Prepared:
    """A strategy ready to run: the operation, and its client-side (attempts, throttled) counts."""

    op: Callable[[], object]
    client_counts: Callable[[], tuple[int, int]] | None = None
    close: Callable[[], None] = lambda: None
    note: str = ""


def _governor_diff(governor: Governor) -> Callable[[], tuple[int, int]]:
    before = governor.stats()

    def counts() -> tuple[int, int]:
        now = governor.stats()
        return now["attempts"] - before["attempts"], now["throttled"] - before["throttled"]

    return counts


def _close(adapter: object) -> Callable[[], None]:
    close = getattr(adapter, "close", None)
    return close if callable(close) else (lambda: None)


def prepare(backend: ThrottledBackend, strategy: str, dek: bytes, callers: int, seed: int) -> Prepared:
    name = unique_name(f"bench-{strategy.replace('-', '')}")
    if strategy == "governor":
        governor = Governor(unique_name(f"bench-{backend.name}"))
        adapter = backend.adapter(name, governor)
        return Prepared(lambda: adapter.wrap(dek), _governor_diff(governor), _close(adapter))
    if strategy == "capexp":
        adapter = backend.adapter(name, cast(Governor, PassThrough()))
        loop = FullJitter(
            base=BACKOFF_BASE,
            cap=BACKOFF_CAP,
            max_attempts=BACKOFF_ATTEMPTS,
            rng=random.Random(seed),  # not crypto  # nosec B311
        )
        return Prepared(
            lambda: loop.call(lambda: adapter.wrap(dek)),
            lambda: (loop.attempts, loop.throttled),
            _close(adapter),
        )
    if strategy == "none":
        adapter = backend.adapter(name, cast(Governor, PassThrough()))
        once = Counting()
        return Prepared(
            lambda: once.call(lambda: adapter.wrap(dek)),
            lambda: (once.attempts, once.throttled),
            _close(adapter),
        )
    if strategy in ("standard", "adaptive"):
        assert backend.name == "aws"  # benchmark sanity check  # nosec B101
        # The key is created through moto directly (not through the throttle); only its alias is used.
        alias = getattr(backend.adapter(name, Governor(f"setup-{name}")), "alias")  # noqa: B009
        client: Any = boto3.session.Session().client(
            "kms",
            region_name="us-east-1",
            endpoint_url=backend.details["endpoint"],
            config=Config(retries={"mode": strategy}, max_pool_connections=max(10, callers)),
            **MOTO_CREDENTIALS,
        )
        return Prepared(lambda: client.encrypt(KeyId=alias, Plaintext=dek), close=client.close)
    if strategy == "azure-core":
        assert backend.name == "azure"  # benchmark sanity check  # nosec B101
        setup = backend.adapter(name, Governor(f"setup-{name}"))
        _close(setup)()
        credential = StaticTokenCredential()
        options: dict[str, Any] = {
            "verify_challenge_resource": False,
            "connection_verify": backend.details["ca_file"],
        }
        with KeyClient(backend.details["vault"], credential, **options) as keys:
            key_id = str(keys.get_key(name).id)
        note = _stock_client_check(backend, key_id, credential, options, dek)
        backend.reset()
        crypto = RemoteCryptographyClient(key_id, credential, **options)  # default retry policy
        return Prepared(lambda: crypto.wrap_key(KeyWrapAlgorithm.aes_256, dek), close=crypto.close, note=note)
    raise ValueError(f"unknown strategy {strategy!r} for {backend.name}")


def _stock_client_check(
    backend: ThrottledBackend,
    key_id: str,
    credential: StaticTokenCredential,
    options: dict[str, Any],
    dek: bytes,
) -> str:
    """Wrap once with the stock CryptographyClient and see whether the emulator saw a wrap."""
    before = backend.counters()
    with CryptographyClient(key_id, credential, **options) as stock:
        stock.wrap_key(KeyWrapAlgorithm.aes_256, dek)
    after = backend.counters()
    sent = sum(after.values()) - sum(before.values())
    if sent == 0:
        return (
            "stock CryptographyClient.wrap_key did not reach the emulator (wrapped locally with a "
            "random key): the baseline uses the remote-only client"
        )
    return f"stock CryptographyClient.wrap_key sent {sent} request(s) to the emulator"


# ----------------------------------------------------------------------------- measurement


@dataclass
class Run:
    backend: str
    strategy: str
    label: str
    ops: int
    callers: int
    limit: float
    successes: int
    failures: int
    unfinished: int
    elapsed_s: float
    goodput_per_s: float
    goodput_share: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int | None
    throttled: int | None
    throttled_share: float | None
    throttle_count: str
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000.0, 1)


def measure(
    backend: ThrottledBackend, strategy: str, *, ops: int, callers: int, max_seconds: float, seed: int
) -> Run:
    dek = os.urandom(32)
    prepared = prepare(backend, strategy, dek, callers, seed)
    try:
        backend.reset()
        result = run_load(prepared.op, ops=ops, callers=callers, max_seconds=max_seconds)
        server = backend.counters()
        client = prepared.client_counts() if prepared.client_counts else None
    finally:
        prepared.close()
    requests: int | None
    throttled: int | None
    if server:
        requests, throttled = server["throttled"] + server["served"], server["throttled"]
        source = "server" if backend.name == "azure" else "proxy"
    elif client is not None:
        requests, throttled, source = client[0], client[1], "client"
    else:
        requests = throttled = None
        source = "n/a"
    goodput = result.goodput
    return Run(
        backend=backend.name,
        strategy=strategy,
        label=LABELS[strategy],
        ops=ops,
        callers=callers,
        limit=backend.limit,
        successes=result.successes,
        failures=result.failures,
        unfinished=ops - result.successes - result.failures,
        elapsed_s=round(result.elapsed, 2),
        goodput_per_s=round(goodput, 2),
        goodput_share=round(goodput / backend.limit, 3),
        p50_ms=_ms(result.percentile(50)),
        p99_ms=_ms(result.percentile(99)),
        requests=requests,
        throttled=throttled,
        throttled_share=round(throttled / requests, 3) if requests and throttled is not None else None,
        throttle_count=source,
        errors=dict(result.errors),
        note=prepared.note,
    )


def _failed(run: Run) -> int:
    return run.failures + run.unfinished


def verdict(runs: list[Run]) -> dict[str, Any]:
    """Does the governor lead this backend's runs on goodput (highest) and failures (fewest)?

    Raw goodput favours a strategy that gives up: it stops early, while the server's burst
    allowance still covers a large part of its short run, so its successes/elapsed can exceed
    the limit. The verdict therefore also compares goodput with the baselines that failed no
    more operations than the governor (that did at least as much of the work)."""
    gov = next((r for r in runs if r.strategy == "governor"), None)
    others = [r for r in runs if r.strategy != "governor"]
    if gov is None or not others:
        return {"backend": runs[0].backend if runs else "", "compared": False}
    best = max(others, key=lambda r: r.goodput_share)
    fewest = min(others, key=_failed)
    comparable = [r for r in others if _failed(r) <= _failed(gov)]
    best_comparable = max(comparable, key=lambda r: r.goodput_share) if comparable else None
    return {
        "backend": gov.backend,
        "compared": True,
        "leads_goodput": gov.goodput_share > best.goodput_share,
        "leads_goodput_at_equal_work": best_comparable is None
        or gov.goodput_share > best_comparable.goodput_share,
        # Fewest failed operations; a tie (e.g. 0 and 0) counts, and is reported as a tie.
        "leads_failures": _failed(gov) <= _failed(fewest),
        "failures_tie": _failed(gov) == _failed(fewest),
        "governor_goodput_share": gov.goodput_share,
        "governor_failed": _failed(gov),
        "best_baseline_goodput": {
            "strategy": best.strategy,
            "share": best.goodput_share,
            "failed": _failed(best),
            "elapsed_s": best.elapsed_s,
        },
        "best_comparable_goodput": None
        if best_comparable is None
        else {"strategy": best_comparable.strategy, "share": best_comparable.goodput_share},
        "fewest_baseline_failed": {"strategy": fewest.strategy, "failed": _failed(fewest)},
    }


@contextmanager
def _quiet_http_logs() -> Iterator[None]:
    """urllib3 warns per discarded pooled connection (16 callers, 10-connection pools): not news."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run(
    *,
    backends: list[str],
    strategies: list[str] | None,
    ops: int,
    callers: int,
    limit: float,
    settle: float,
    seed: int,
    progress: Callable[[str], None],
) -> list[Run]:
    # Each run bounds itself: 3x the ideal time at the limit plus a minute, then unstarted ops stop.
    max_seconds = 3.0 * ops / limit + 60.0
    runs: list[Run] = []
    with _quiet_http_logs():
        for backend_name in backends:
            chosen = [s for s in STRATEGIES[backend_name] if strategies is None or s in strategies]
            if not chosen:
                continue
            progress(f"{backend_name}: starting the throttled backend ({limit:g}/s)")
            with THROTTLED[backend_name](limit) as backend:
                for index, strategy in enumerate(chosen):
                    time.sleep(settle)  # let the backend's limiter refill and earlier sockets drain
                    progress(f"{backend_name}: {strategy} ({ops} wraps, {callers} callers) ...")
                    result = measure(
                        backend,
                        strategy,
                        ops=ops,
                        callers=callers,
                        max_seconds=max_seconds,
                        seed=seed + index,
                    )
                    progress(
                        f"{backend_name}: {strategy}: {result.successes}/{ops} ok in {result.elapsed_s:.1f}s,"
                        f" goodput {result.goodput_share:.0%} of the limit, failed {result.failures}"
                    )
                    runs.append(result)
    return runs


# ----------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(runs: list[Run]) -> str:
    header = (
        f"{'backend':<7} {'strategy':<26} {'goodput':>8} {'ok':>6} {'failed':>6} {'unrun':>5}"
        f" {'throttled':>9} {'(by)':<6} {'p50 ms':>8} {'p99 ms':>8} {'elapsed':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(
            f"{r.backend:<7} {r.label:<26} {r.goodput_share:>8.1%} {r.successes:>6} {r.failures:>6}"
            f" {r.unfinished:>5} {_fmt(r.throttled_share, '.1%'):>9} {r.throttle_count:<6}"
            f" {_fmt(r.p50_ms, ',.1f'):>8} {_fmt(r.p99_ms, ',.1f'):>8} {r.elapsed_s:>7.1f}s"
        )
    return "\n".join(lines)


def summary(runs: list[Run]) -> list[str]:
    lines = []
    for backend in dict.fromkeys(r.backend for r in runs):
        mine = [r for r in runs if r.backend == backend]
        v = verdict(mine)
        if not v["compared"]:
            lines.append(f"{backend}: nothing to compare (governor or baselines not run)")
            continue
        gov_share, gov_failed = v["governor_goodput_share"], v["governor_failed"]
        best, fewest, fair = (
            v["best_baseline_goodput"],
            v["fewest_baseline_failed"],
            v["best_comparable_goodput"],
        )
        if v["leads_goodput"]:
            goodput = (
                f"leads on goodput ({gov_share:.1%} vs best baseline"
                f" {LABELS[best['strategy']]} {best['share']:.1%})"
            )
        else:
            goodput = (
                f"does NOT lead on raw goodput ({gov_share:.1%} vs"
                f" {LABELS[best['strategy']]} {best['share']:.1%},"
                f" which failed {best['failed']} operations in {best['elapsed_s']:.1f}s)"
            )
            if fair is None:
                goodput += "; every baseline failed more operations (at equal work it leads)"
            elif v["leads_goodput_at_equal_work"]:
                goodput += (
                    f"; among baselines failing no more operations it leads"
                    f" (vs {LABELS[fair['strategy']]} {fair['share']:.1%})"
                )
            else:
                goodput += (
                    f"; it does NOT lead among baselines failing no more operations either"
                    f" ({LABELS[fair['strategy']]} {fair['share']:.1%})"
                )
        if gov_failed < fewest["failed"]:
            failures = f"leads on failures ({gov_failed} vs fewest baseline {fewest['failed']})"
        elif gov_failed == fewest["failed"]:
            failures = f"ties on failures ({gov_failed}, as {LABELS[fewest['strategy']]})"
        else:
            failures = (
                f"does NOT lead on failures ({gov_failed} vs {LABELS[fewest['strategy']]} {fewest['failed']})"
            )
        lines.append(f"{backend}: the governor {goodput}; {failures}")
        for r in mine:
            if r.errors:
                lines.append(f"  {backend} {r.label}: errors {r.errors}")
            if r.note:
                lines.append(f"  {backend} {r.label}: {r.note}")
        if NOTES[backend]:
            lines.append(f"  {backend}: {NOTES[backend]}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", type=int, default=2000, help="wraps per strategy (default 2000)")
    parser.add_argument("--callers", type=int, default=16, help="concurrent threads (default 16)")
    parser.add_argument("--limit", type=float, default=50.0, help="backend limit, operations/s (default 50)")
    parser.add_argument("--backends", default="vault,aws,azure", help="comma-separated (default all)")
    parser.add_argument("--strategies", default="", help="comma-separated subset (default: all per backend)")
    parser.add_argument("--settle", type=float, default=2.0, help="quiet seconds before each run (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the full-jitter loop's random source")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown backend(s): {', '.join(unknown)} (choose from {', '.join(STRATEGIES)})")
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()] or None
    known = {s for group in STRATEGIES.values() for s in group}
    if strategies and set(strategies) - known:
        parser.error(f"unknown strategy: {', '.join(sorted(set(strategies) - known))}")
    if args.ops < 1 or args.callers < 1 or args.limit <= 0:
        parser.error("--ops and --callers must be >= 1 and --limit > 0")

    def progress(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.monotonic()
    runs = run(
        backends=backends,
        strategies=strategies,
        ops=args.ops,
        callers=args.callers,
        limit=args.limit,
        settle=args.settle,
        seed=args.seed,
        progress=progress,
    )
    total = time.monotonic() - started
    report = {
        "settings": {
            "ops": args.ops,
            "callers": args.callers,
            "limit_per_s": args.limit,
            "dek_bytes": 32,
            "settle_s": args.settle,
            "capexp": {"base_s": BACKOFF_BASE, "cap_s": BACKOFF_CAP, "max_attempts": BACKOFF_ATTEMPTS},
        },
        "runs": [asdict(r) for r in runs],
        "verdicts": [
            verdict([r for r in runs if r.backend == b]) for b in dict.fromkeys(r.backend for r in runs)
        ],
        "total_seconds": round(total, 1),
    }
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.ops} wraps of a 32-byte DEK per run, {args.callers} callers, limit {args.limit:g}/s;"
        f" capexp: base {BACKOFF_BASE * 1000:g} ms, cap {BACKOFF_CAP:g} s, {BACKOFF_ATTEMPTS} attempts"
    )
    print(table(runs))
    print("goodput = successes / elapsed / limit; unrun = not started within the run's time bound;")
    print("throttled = throttled requests / requests, counted by the proxy (aws), the emulator (azure)")
    print("or the client (vault); p50/p99 over successful operations.")
    for line in summary(runs):
        print(line)
    print(f"total {total:.0f}s")


if __name__ == "__main__":
    main()
