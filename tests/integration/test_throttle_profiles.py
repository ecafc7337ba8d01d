"""Throttling that behaves like the real services: the Azure emulator's limit and sustained-load model
measured from real HTTPS clients, and every named profile of ``emulators.profiles`` started for real."""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulators.azure_keyvault import AzureKeyVaultEmulator, SustainedLoad, managed_hsm_limits
from emulators.profiles import PROFILES, ProfileError, describe_profile, start_local
from kms_adapters.accounting import accounting
from kms_adapters.errors import Throttled
from kms_adapters.governor import PassThroughGovernor
from rekey.backends import adapter_for
from rekey.config import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UNTHROTTLED = {"create": 0.0, "read": 0.0, "manage": 0.0}


class Raw:
    """One keep-alive HTTPS connection to the emulator, no SDK and no retries: every request is
    one request on the wire."""

    def __init__(self, emulator: AzureKeyVaultEmulator) -> None:
        host, port = emulator.url.removeprefix("https://").split(":")
        context = ssl.create_default_context(cafile=emulator.ca_file)
        self._conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": "Bearer t", "Content-Type": "application/json"}
        data = json.dumps(body) if body is not None else None
        self._conn.request(method, f"{path}?api-version=7.4", body=data, headers=headers)
        response = self._conn.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None

    def wrap(self, key: str) -> int:
        value = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        return self.call("POST", f"/keys/{key}//wrapkey", {"alg": "A256KW", "value": value})[0]

    def close(self) -> None:
        self._conn.close()


def _oct_key(emulator: AzureKeyVaultEmulator) -> str:
    name = f"k-{secrets.token_hex(4)}"
    raw = Raw(emulator)
    try:
        status, _ = raw.call("POST", f"/keys/{name}/create", {"kty": "oct-HSM", "key_size": 256})
    finally:
        raw.close()
    assert status == 200
    return name


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[Callable[..., AzureKeyVaultEmulator]]:
    started: list[AzureKeyVaultEmulator] = []

    def start(**options: Any) -> AzureKeyVaultEmulator:
        emu = AzureKeyVaultEmulator(tmp_path / f"state-{len(started)}", retry_after=False, **options)
        emu.start()
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


def _offer(
    emulator: AzureKeyVaultEmulator,
    key: str,
    *,
    rate: float,
    seconds: float,
    threads: int,
    stop: threading.Event | None = None,
) -> tuple[float, float, dict[int, int]]:
    """Offer ``rate`` wraps/s for ``seconds`` from ``threads`` paced connections (a late slot is
    skipped, never made up, so the offered rate is never above ``rate``). Returns the times of the
    first request and of the last answer, and the answers by status."""
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    first: list[float] = []
    last: list[float] = []
    interval = threads / rate
    begin = time.monotonic() + 0.05

    def run(index: int) -> None:
        raw = Raw(emulator)
        slot = begin + index * interval / threads
        try:
            while slot < begin + seconds and not (stop is not None and stop.is_set()):
                now = time.monotonic()
                if now < slot:
                    time.sleep(slot - now)
                sent = time.monotonic()
                status = raw.wrap(key)
                done = time.monotonic()
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    first.append(sent)
                    last.append(done)
                slot += interval
                while slot < time.monotonic():
                    slot += interval  # late: skip the slot
        finally:
            raw.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 60)
    return min(first), max(last), statuses


def _hurry(emulator: AzureKeyVaultEmulator, key: str, stop: threading.Event, threads: int = 4) -> list[int]:
    """Threads that send again at once after every answer (429 included) until ``stop``."""
    counts = [0] * threads

    def run(index: int) -> None:
        raw = Raw(emulator)
        try:
            while not stop.is_set():
                raw.wrap(key)
                counts[index] += 1
        finally:
            raw.close()

    for index in range(threads):
        threading.Thread(target=run, args=(index,), daemon=True).start()
    return counts


def _wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_emulator_serves_exactly_r_per_second(emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    """Offered 2R/s for 3 s: served = one second's burst + R x elapsed, within a few %."""
    rate = 100.0
    emu = emulator(limits={**UNTHROTTLED, **managed_hsm_limits(rate)})
    key = _oct_key(emu)
    emu.reset_stats()
    start, end, statuses = _offer(emu, key, rate=2 * rate, seconds=3.0, threads=8)
    wrap = emu.stats()["classes"]["wrap"]
    allowed = rate + rate * (end - start)  # bucket capacity (one second) + refill over the window
    assert wrap["limit"] == rate
    assert wrap["served"] == statuses[200] and wrap["throttled"] == statuses[429]
    assert set(statuses) == {200, 429}
    assert wrap["served"] <= allowed + 1
    assert wrap["served"] >= 0.95 * allowed, (wrap, allowed)
    # The premise: it was offered well above what the bucket allows (2R/s aimed at, 1.5x allowed
    # when the client keeps up; a loaded machine's 8 client threads fell 1% short of that once).
    assert wrap["served"] + wrap["throttled"] >= 1.25 * allowed


SMALL = SustainedLoad(
    share=1.5, after=1.0, drop=0.3, latency_step=0.05, latency_cap=0.1, recover_share=1.0, recover_after=1.0
)


def test_sustained_model_degrades_under_a_hurried_client_and_recovers(
    emulator: Callable[..., AzureKeyVaultEmulator],
) -> None:
    rate = 50.0
    emu = emulator(limits={**UNTHROTTLED, "wrap": rate}, sustained=SMALL)
    key = _oct_key(emu)
    stop = threading.Event()
    # 8 callers sending again at once: even at the latency cap they send 80/s > recover_share x R.
    counts = _hurry(emu, key, stop, threads=8)
    try:
        _wait_for(lambda: emu.stats()["classes"]["wrap"]["degraded"])
        wrap = emu.stats()["classes"]["wrap"]
        assert wrap["limit"] == pytest.approx(rate * SMALL.drop)
        assert wrap["normal_limit"] == rate
        assert wrap["degradations"] == 1 and wrap["degraded_since"] is not None
        assert wrap["latency_ms"] >= SMALL.latency_step * 1000
        assert emu.stats()["degraded"] == ["wrap"]
        assert not emu.stats()["classes"]["read"]["degraded"]

        # Each delayed answer waits in its own thread, no lock held: 10 at once take about one
        # delay, not ten.
        raws = [Raw(emu) for _ in range(10)]
        for raw in raws:
            raw.call("GET", "/_emulator/health")  # the TLS handshake, before the clock starts
        began = time.monotonic()
        workers = [threading.Thread(target=raw.wrap, args=(key,)) for raw in raws]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        elapsed = time.monotonic() - began
        for raw in raws:
            raw.close()
        assert elapsed >= SMALL.latency_step  # held back
        assert elapsed < 10 * SMALL.latency_step / 2  # but not one after the other
        assert emu.stats()["classes"]["wrap"]["degraded"]  # still, while the hurry goes on
    finally:
        stop.set()
    assert sum(counts) > 0
    # The load falls back: below recover_share x limit for recover_after -> normal again.
    _wait_for(lambda: not emu.stats()["classes"]["wrap"]["degraded"])
    wrap = emu.stats()["classes"]["wrap"]
    assert wrap["limit"] == rate and wrap["latency_ms"] == 0 and wrap["degradations"] == 1
    assert emu.stats()["degraded"] == []


def test_sustained_model_spares_a_paced_client(emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    """A client near the limit (1.05 x R, throttled ones included) never degrades the class."""
    rate = 50.0
    emu = emulator(limits={**UNTHROTTLED, "wrap": rate}, sustained=SMALL)
    key = _oct_key(emu)
    _, _, statuses = _offer(emu, key, rate=1.05 * rate, seconds=3.0, threads=2)
    wrap = emu.stats()["classes"]["wrap"]
    assert wrap["degradations"] == 0 and not wrap["degraded"]
    assert wrap["limit"] == rate and statuses.get(200, 0) > 2 * rate
    assert 0 < wrap["received_rate"] <= SMALL.share * rate


def test_sustained_model_set_through_the_api(emulator: Callable[..., AzureKeyVaultEmulator]) -> None:
    emu = emulator(limits={**UNTHROTTLED, "wrap": 20.0})
    assert emu.stats()["sustained"] is None
    raw = Raw(emu)
    status, stats = raw.call("POST", "/_emulator/config", {"sustained": {"after": 2, "drop": 0.5}})
    assert status == 200
    assert stats["sustained"] == {**SustainedLoad().to_dict(), "after": 2.0, "drop": 0.5}
    status, stats = raw.call("POST", "/_emulator/config", {"sustained": {"drop": 2}})
    assert status == 400 and "drop" in stats["error"]["message"]
    status, stats = raw.call("POST", "/_emulator/config", {"sustained": {"bogus": 1}})
    assert status == 400 and "bogus" in stats["error"]["message"]
    status, stats = raw.call("POST", "/_emulator/config", {"sustained": None})
    assert status == 200 and stats["sustained"] is None
    raw.close()
    emu.set_sustained(SMALL)
    assert emu.sustained == SMALL and emu.stats()["sustained"]["after"] == 1.0


def test_emulator_cli_profile(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "emulators.azure_keyvault", "--port", "0", "--state-dir", str(tmp_path)]
    command += ["--profile", "managed-hsm-sustained", "--throttle-rate", "40", "--sustained-after", "3"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().strip().split("=", 1) for _ in range(2))
        url, ca = lines["AZURE_KEYVAULT_URL"], lines["AZURE_KEYVAULT_CA_FILE"]
        host, port = url.removeprefix("https://").split(":")
        conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=ca))
        conn.request("GET", "/_emulator/stats")
        stats = json.loads(conn.getresponse().read())
        conn.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert stats["sustained"]["after"] == 3.0 and stats["sustained"]["share"] == 1.5
    classes = stats["classes"]
    assert classes["wrap"]["limit"] == 40.0
    assert classes["rsa2048"]["limit"] == pytest.approx(1100 * 40 / 2100)
    assert classes["create"]["limit"] == 1.0 and classes["read"]["limit"] == 1100.0


@pytest.mark.parametrize(
    "args",
    [
        ["--profile", "bogus"],
        ["--throttle-rate", "0"],
        ["--throttle-rate", "nan"],
        ["--profile", "managed-hsm", "--sustained-after", "3"],
        ["--profile", "managed-hsm-sustained", "--sustained-drop", "2"],
    ],
)
def test_emulator_cli_refuses_bad_throttling(tmp_path: Path, args: list[str]) -> None:
    command = [sys.executable, "-m", "emulators.azure_keyvault", "--state-dir", str(tmp_path), *args]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr


@pytest.mark.parametrize("name", list(PROFILES))
def test_profile_starts_throttles_and_answers(tmp_path: Path, name: str) -> None:
    """Each profile through rekey's own adapter, built from the settings it hands out."""
    rate = 10.0
    with start_local(name, tmp_path, rate=rate) as local:
        assert local.profile == name and local.backend == PROFILES[name].backend
        assert local.rate == rate
        settings = Settings(home=tmp_path / "home", **local.settings)  # type: ignore[arg-type]
        adapter = adapter_for(settings, f"{local.backend}:stress-{secrets.token_hex(3)}")
        adapter.create()
        local.reset_stats()
        dek = secrets.token_bytes(32)
        wrapped: list[bytes] = []

        def caller() -> None:  # the governor retries what is throttled
            for _ in range(5):
                wrapped.append(adapter.wrap(dek).ciphertext)

        # 6 callers at once: above R whenever an operation takes less than 0.6 s.
        callers = [threading.Thread(target=caller) for _ in range(6)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(120)
        assert len(wrapped) == 30
        assert adapter.unwrap(wrapped[-1]) == dek
        stats = local.stats()
        assert stats["served"] >= 31 and stats["throttled"] >= 1, stats
        local.reset_stats()
        assert local.stats()["served"] == 0 and local.stats()["throttled"] == 0
        described = local.describe()
        json.dumps(described)
        assert described["profile"] == name and described["rate"] == rate
        assert described["endpoints"] == local.settings
        if name == "managed-hsm-sustained":
            assert described["sustained"] == SustainedLoad().to_dict()
            assert stats["degraded"] is False


def test_profile_defaults_and_bad_input(tmp_path: Path) -> None:
    assert describe_profile("aws-kms")["rate"] == 10000.0
    assert describe_profile("vault-quota")["quota"]["path"] == "transit/"
    hsm = describe_profile("managed-hsm")
    assert hsm["rate"] == 2100.0 and hsm["limits"]["create"] == 1.0 and hsm["sustained"] is None
    assert describe_profile("managed-hsm", rate=210)["limits"]["rsa2048"] == pytest.approx(110)
    assert describe_profile("managed-hsm-sustained", after=30)["sustained"]["after"] == 30.0
    bad: list[tuple[str, dict[str, Any]]] = [
        ("nope", {}),
        ("vault-quota", {"rate": 0}),
        ("vault-quota", {"rate": -5}),
        ("aws-kms", {"rate": math.inf}),
        ("aws-kms", {"rate": "fast"}),
        ("managed-hsm", {"after": 3}),
        ("managed-hsm-sustained", {"drop": 0}),
        ("aws-kms", {"burst": 0.5}),
    ]
    for name, options in bad:
        with pytest.raises(ProfileError) as excinfo, start_local(name, tmp_path, **options):
            pass
        assert "\n" not in str(excinfo.value) and excinfo.value.exit_code == 2


@pytest.mark.parametrize("name", ["aws-kms", "managed-hsm"])
@pytest.mark.parametrize("strategy", ["sdk-default", "naive"])
def test_other_strategies_are_counted_request_by_request(tmp_path: Path, name: str, strategy: str) -> None:
    """The stress harness's comparison strategies (SDK retries on, or immediate resends) against
    the real throttled stack: every request the client counts is one the server saw."""
    with start_local(name, tmp_path, rate=5.0) as local:
        settings = Settings(home=tmp_path / "home", **local.settings)  # type: ignore[arg-type]
        key_ref = f"{local.backend}:stress-{secrets.token_hex(3)}"
        adapter_for(settings, key_ref).create()
        sdk = strategy == "sdk-default"
        gov = PassThroughGovernor(f"{strategy}-{name}", attempts=1 if sdk else 10, counts=not sdk)
        adapter = adapter_for(settings, key_ref, governor=gov, sdk_retries=sdk)
        adapter.wrap(secrets.token_bytes(32))  # caches the key's versions (and Azure's auth challenge)
        time.sleep(1.2)  # a fresh second of quota
        local.reset_stats()
        totals: list[tuple[int, int]] = []
        failures: list[str] = []

        def caller() -> None:
            for _ in range(4):
                with accounting() as acc:
                    try:
                        adapter.wrap(secrets.token_bytes(32))
                    except Throttled:
                        failures.append("throttled")
                totals.append((acc.requests, acc.throttled))

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(120)
        stats = local.stats()
        requests = sum(r for r, _ in totals)
        throttled = sum(t for _, t in totals)
        assert len(totals) == 16
        assert throttled >= 1, (totals, stats)  # 16 wraps at once against 5/s
        assert throttled == stats["throttled"], (totals, stats)
        assert requests == stats["served"] + stats["throttled"] + stats.get("unmetered", 0), (totals, stats)
        if strategy == "sdk-default" and local.backend == "azure":
            # azure-core's default RetryPolicy does not resend a POST (wrapkey) answered 429: it
            # resends POST only after 500, 503 and 504. Every throttle reaches the caller.
            assert max(r for r, _ in totals) == 1 and len(failures) == throttled
        else:
            assert max(r for r, _ in totals) > 1  # some wrap was sent more than once
        snapshot = gov.snapshot()
        assert snapshot.current_rate is None and snapshot.state == "closed"


@pytest.mark.parametrize("name", ["vault-quota", "aws-kms", "managed-hsm"])
def test_set_rate_lifts_the_throttle_and_puts_it_back(tmp_path: Path, name: str) -> None:
    """``set_rate(None)`` (what the rotation benchmarks seed under): 40 wraps at once at R = 2
    meet no throttle; ``set_rate(R)`` throttles them again. One attempt per wrap, no retries."""
    with start_local(name, tmp_path, rate=2.0) as local:
        settings = Settings(home=tmp_path / "home", **local.settings)  # type: ignore[arg-type]
        key_ref = f"{local.backend}:lift-{secrets.token_hex(3)}"
        adapter_for(settings, key_ref).create()
        gov = PassThroughGovernor(f"lift-{name}", attempts=1)
        adapter = adapter_for(settings, key_ref, governor=gov)

        def burst() -> dict[str, Any]:
            local.reset_stats()
            outcomes: list[str] = []

            def caller() -> None:
                for _ in range(10):
                    try:
                        adapter.wrap(secrets.token_bytes(32))
                        outcomes.append("ok")
                    except Throttled:
                        outcomes.append("throttled")

            callers = [threading.Thread(target=caller) for _ in range(4)]
            for thread in callers:
                thread.start()
            for thread in callers:
                thread.join(120)
            assert len(outcomes) == 40
            return local.stats()

        local.set_rate(None)
        lifted = burst()
        assert lifted["throttled"] == 0 and lifted["served"] >= 40, lifted
        local.set_rate(2.0)
        time.sleep(1.1)
        again = burst()
        assert again["throttled"] >= 30, again
        with pytest.raises(ProfileError):
            local.set_rate(0)
