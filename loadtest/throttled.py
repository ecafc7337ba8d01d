"""Throttled backends and a bounded load runner, shared by the throttling test and
``loadtest/bench_throttle.py``.

Each backend is throttled the way users meet it: OpenBao with its own rate-limit quota on the
Transit encrypt path; moto behind the throttling proxy answering AWS's ``ThrottlingException``;
the Azure emulator with a per-second limit on wrap operations and Retry-After switched off
(the case azure-core does not retry).
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emulators.azure_keyvault import AzureKeyVaultEmulator
from emulators.servers import OpenBao, moto_server, openbao_dev
from emulators.throttle_proxy import ThrottleProxy
from kms_adapters.aws_kms import AwsKmsAdapter
from kms_adapters.azure_hsm import AzureHsmAdapter, StaticTokenCredential
from kms_adapters.contract import KmsAdapter
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter

_MOTO_SECRET = "testing"  # noqa: S105 - moto's fixed dev credential, not a secret  # nosec B105
MOTO_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": _MOTO_SECRET}


@dataclass
class LoadResult:
    ops: int
    callers: int
    successes: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds, successful operations

    @property
    def goodput(self) -> float:
        return self.successes / self.elapsed if self.elapsed else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        if len(self.latencies) == 1:
            return self.latencies[0]
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[int(q) - 1]


def run_load(op: Callable[[], object], *, ops: int, callers: int, max_seconds: float = 300.0) -> LoadResult:
    """Run ``op`` ``ops`` times from ``callers`` threads; stops by itself after ``max_seconds``."""
    result = LoadResult(ops=ops, callers=callers)
    lock = threading.Lock()
    remaining = [ops]
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0 or time.monotonic() > deadline:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                op()
            except Exception as exc:  # counted, not raised: the run reports every failure
                with lock:
                    result.failures += 1
                    result.errors[type(exc).__name__] += 1
                continue
            took = time.perf_counter() - start
            with lock:
                result.successes += 1
                result.latencies.append(took)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(callers)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + 30)
    result.elapsed = time.monotonic() - start
    return result


@dataclass
class ThrottledBackend:
    """One throttled backend: how to build an adapter on it, and its server-side counters."""

    name: str
    limit: float
    adapter: Callable[[str, Governor], KmsAdapter]
    counters: Callable[[], dict[str, int]]  # throttled / served as the server (or proxy) saw them
    reset: Callable[[], None]
    details: dict[str, Any] = field(default_factory=dict)


def _quota(server: OpenBao, name: str, path: str, rate: float) -> None:
    response = server.client().adapter.post(
        f"/v1/sys/quotas/rate-limit/{name}", json={"path": path, "rate": rate, "interval": "1s"}
    )
    del response


@contextmanager
def throttled_vault(limit: float) -> Iterator[ThrottledBackend]:
    with openbao_dev() as server:
        client = server.client()
        counts: Counter[str] = Counter()

        def adapter(name: str, governor: Governor) -> KmsAdapter:
            key = VaultTransitAdapter(
                client, name, release_store=MemoryReleasePolicyStore(), governor=governor
            )
            key.create()
            _quota(server, f"q-{name}", f"transit/encrypt/{name}", limit)
            return key

        yield ThrottledBackend(
            "vault",
            limit,
            adapter,
            counters=lambda: dict(counts),
            reset=counts.clear,
            details={"addr": server.addr, "token": server.token, "throttle": "OpenBao rate-limit quota"},
        )


@contextmanager
def throttled_aws(limit: float) -> Iterator[ThrottledBackend]:
    with moto_server() as moto, ThrottleProxy(moto, rate=limit, profile="aws") as proxy:

        def adapter(name: str, governor: Governor) -> KmsAdapter:
            # Create through moto directly: the throttle is for the measured traffic.
            AwsKmsAdapter(
                name,
                endpoint_url=moto,
                region="us-east-1",
                release_store=MemoryReleasePolicyStore(),
                credentials=MOTO_CREDENTIALS,
                governor=Governor(f"setup-{name}"),
            ).create()
            return AwsKmsAdapter(
                name,
                endpoint_url=proxy.url,
                region="us-east-1",
                release_store=MemoryReleasePolicyStore(),
                credentials=MOTO_CREDENTIALS,
                governor=governor,
            )

        def counters() -> dict[str, int]:
            stats = proxy.stats()
            return {"throttled": int(stats["throttled"]), "served": int(stats["forwarded"])}

        yield ThrottledBackend(
            "aws",
            limit,
            adapter,
            counters=counters,
            reset=proxy.reset_stats,
            details={
                "endpoint": proxy.url,
                "backend": moto,
                "throttle": "proxy (HTTP 400 ThrottlingException)",
            },
        )


@contextmanager
def throttled_azure(limit: float) -> Iterator[ThrottledBackend]:
    state = Path(tempfile.mkdtemp(prefix="rekey-azure-"))
    with AzureKeyVaultEmulator(
        state, limits={"wrap": limit, "create": 0, "read": 0, "manage": 0}, retry_after=False
    ) as emulator:

        def adapter(name: str, governor: Governor) -> KmsAdapter:
            key = AzureHsmAdapter(
                name,
                vault_url=emulator.url,
                credential=StaticTokenCredential(),
                connection_verify=emulator.ca_file,
                release_store=MemoryReleasePolicyStore(),
                governor=governor,
            )
            key.create()
            return key

        def counters() -> dict[str, int]:
            wrap = emulator.stats()["classes"]["wrap"]
            return {"throttled": int(wrap["throttled"]), "served": int(wrap["served"])}

        yield ThrottledBackend(
            "azure",
            limit,
            adapter,
            counters=counters,
            reset=emulator.reset_stats,
            details={
                "vault": emulator.url,
                "ca_file": emulator.ca_file,
                "throttle": "emulator 429 Throttled, no Retry-After",
            },
        )


THROTTLED = {"vault": throttled_vault, "aws": throttled_aws, "azure": throttled_azure}


def unique_name(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"
