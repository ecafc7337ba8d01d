"""The throttling proxy in front of a real moto server, with a real boto3 KMS client."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from emulators.throttle_proxy import KMS_CRYPTO_OPERATIONS, ThrottleProxy, TokenBucket
from kms_adapters.errors import Throttled
from kms_adapters.governor import Governor
from tests.fixtures.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def kms(url: str, **retries: Any) -> Any:
    """A boto3 KMS client with SDK retries off, unless ``retries`` says otherwise.

    Off means ``total_max_attempts=1``: botocore's ``max_attempts`` counts *retries* (it becomes
    ``total_max_attempts = max_attempts + 1``), so ``{"max_attempts": 1}`` still retries once;
    see ``test_max_attempts_1_still_retries_once``.
    """
    return boto3.client(
        "kms",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries=retries or {"total_max_attempts": 1}),
    )


@pytest.fixture
def proxy(moto_server: str) -> Iterator[ThrottleProxy]:
    with ThrottleProxy(moto_server, rate=1000, burst=100, profile="aws") as p:
        yield p


def test_forwards_kms_calls_while_tokens_last(proxy: ThrottleProxy) -> None:
    client = kms(proxy.url)
    key_id = client.create_key(Description="through the proxy")["KeyMetadata"]["KeyId"]
    blob = client.encrypt(KeyId=key_id, Plaintext=b"dek")["CiphertextBlob"]
    assert client.decrypt(CiphertextBlob=blob)["Plaintext"] == b"dek"
    with pytest.raises(ClientError) as err:  # the backend's own errors pass through untouched
        client.describe_key(KeyId="alias/no-such-alias")
    assert err.value.response["Error"]["Code"] == "NotFoundException"
    assert proxy.stats()["forwarded"] == 4
    assert proxy.stats()["throttled"] == 0


def test_empty_bucket_gives_botocore_a_throttling_exception(proxy: ThrottleProxy) -> None:
    client = kms(proxy.url)
    key_id = client.create_key()["KeyMetadata"]["KeyId"]
    proxy.set_rate(5, burst=1)
    proxy.drain()
    with pytest.raises(ClientError) as err:
        client.encrypt(KeyId=key_id, Plaintext=b"x")
    error = err.value.response
    assert error["Error"]["Code"] == "ThrottlingException"
    assert error["Error"]["Message"] == "Rate exceeded"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert proxy.throttled == 1

    time.sleep(0.25)  # one token at 5/s
    assert client.encrypt(KeyId=key_id, Plaintext=b"x")["KeyId"].endswith(key_id)
    with pytest.raises(ClientError) as again:  # and the bucket is empty again at once
        client.encrypt(KeyId=key_id, Plaintext=b"x")
    assert again.value.response["Error"]["Code"] == "ThrottlingException"
    assert (proxy.forwarded, proxy.throttled) == (2, 2)


def test_only_kms_crypto_operations_are_metered(moto_server: str) -> None:
    """AWS meters its operations in separate quotas: with ``operations`` only the shared
    symmetric-crypto ones take tokens; CreateKey, DescribeKey, ListKeys pass unmetered."""
    with ThrottleProxy(moto_server, rate=0, profile="aws", operations=KMS_CRYPTO_OPERATIONS) as p:
        client = kms(p.url)
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        assert client.describe_key(KeyId=key_id)["KeyMetadata"]["Enabled"]
        with pytest.raises(ClientError) as err:
            client.encrypt(KeyId=key_id, Plaintext=b"x")
        assert err.value.response["Error"]["Code"] == "ThrottlingException"
        with pytest.raises(ClientError):
            client.generate_data_key(KeyId=key_id, KeySpec="AES_256")
        stats = p.stats()
    assert (stats["forwarded"], stats["unmetered"], stats["throttled"]) == (2, 2, 2)
    assert stats["operations"] == sorted(KMS_CRYPTO_OPERATIONS)


@pytest.mark.parametrize("mode", ["legacy", "standard"])
def test_max_attempts_1_still_retries_once(proxy: ThrottleProxy, mode: str) -> None:
    client = kms(proxy.url, mode=mode, max_attempts=1)
    proxy.set_rate(0)
    with pytest.raises(ClientError) as err:
        client.list_keys()
    assert err.value.response["Error"]["Code"] == "ThrottlingException"
    assert proxy.throttled == 2  # the SDK sent it twice


def test_botocore_retry_handler_treats_it_as_throttling(proxy: ThrottleProxy) -> None:
    """With SDK retries on (standard mode), the proxy's answer is retried like a real throttle."""
    client = kms(proxy.url, mode="standard", max_attempts=3)
    proxy.set_rate(20, burst=1)
    proxy.drain()
    keys = client.list_keys()
    assert "Keys" in keys
    assert proxy.throttled >= 1
    assert keys["ResponseMetadata"]["RetryAttempts"] >= 1


def test_keep_alive_and_counters_over_one_connection(proxy: ThrottleProxy) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/moto-api/data.json")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert response.getheader("Connection") != "close"
        assert conn.sock is not None  # still the same connection
    finally:
        conn.close()
    assert proxy.forwarded == 3


@pytest.mark.parametrize("retry_after", [False, True])
def test_azure_profile(moto_server: str, retry_after: bool) -> None:
    with ThrottleProxy(moto_server, rate=0.5, burst=1, profile="azure", retry_after=retry_after) as p:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
        try:
            codes = []
            for _ in range(2):
                conn.request("GET", "/moto-api/data.json")
                response = conn.getresponse()
                body = response.read()
                codes.append(response.status)
            assert codes == [200, 429]  # one token, then the bucket is empty
            assert json.loads(body)["error"]["code"] == "Throttled"
            assert response.getheader("Content-Type", "").startswith("application/json")
            if retry_after:
                assert response.getheader("Retry-After") == "2"  # 1 token at 0.5/s, whole seconds
            else:
                assert response.getheader("Retry-After") is None
        finally:
            conn.close()
        assert p.stats()["forwarded"] == 1 and p.stats()["throttled"] == 1


def test_vault_profile(moto_server: str) -> None:
    with ThrottleProxy(moto_server, rate=0, profile="vault") as p:
        conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=5)
        try:
            conn.request("POST", "/v1/transit/rewrap/k1", body=b"{}")
            response = conn.getresponse()
            body = json.loads(response.read())
        finally:
            conn.close()
    assert response.status == 429
    assert body == {"errors": ['request path "transit/rewrap/k1": rate limit quota exceeded']}


def test_token_bucket_accounting() -> None:
    now = [0.0]
    bucket = TokenBucket(10, clock=lambda: now[0])
    assert bucket.burst == 1
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 0.05
    assert bucket.take() == pytest.approx(0.05)
    now[0] += 0.05
    assert bucket.take() == 0.0
    bucket.configure(100, burst=5)
    now[0] += 10
    assert [bucket.take() for _ in range(6)][:5] == [0.0] * 5
    bucket.configure(float("inf"))
    assert all(bucket.take() == 0.0 for _ in range(1000))


def test_standalone(moto_server: str) -> None:
    port = free_port()
    command = [sys.executable, "-m", "emulators.throttle_proxy", "--backend", moto_server]
    command += ["--rate", "50", "--port", str(port)]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, timeout=15)
        client = kms(f"http://127.0.0.1:{port}")
        assert "Keys" in client.list_keys()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"throttle proxy http://127.0.0.1:{port} -> {moto_server}" in out
    assert json.loads(out.strip().splitlines()[-1])["forwarded"] == 1


def test_governor_settles_under_the_proxy_limit(moto_server: str) -> None:
    """End to end in real time: 16 threads, one governor, boto3 -> proxy (50/s) -> moto, for 4 s.

    The unpaced start (16 callers before the first throttle) costs a burst of throttles whose
    size depends on scheduling; "settles" is judged on the steady state after the first second."""
    with ThrottleProxy(moto_server, rate=50, profile="aws") as p:
        client = kms(p.url)
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        p.reset_stats()
        governor = Governor(f"proxy-{p.port}")

        def encrypt() -> Any:
            try:
                return client.encrypt(KeyId=key_id, Plaintext=b"dek")
            except ClientError as exc:
                if exc.response["Error"]["Code"] == "ThrottlingException":
                    raise Throttled("AWS KMS throttled encrypt") from None
                raise

        lock = threading.Lock()
        done: list[int] = []
        failures: list[BaseException] = []
        start = time.monotonic()
        stop_at = start + 4.0

        def worker() -> None:
            count = 0
            try:
                while time.monotonic() < stop_at:
                    governor.call(encrypt, op="encrypt")
                    count += 1
            except BaseException as exc:
                failures.append(exc)
            with lock:
                done.append(count)

        threads = [threading.Thread(target=worker) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, start + 1.0 - time.monotonic()))
        warm_throttled, warm_forwarded = p.throttled, p.forwarded
        for t in threads:
            t.join(timeout=30)
        elapsed = time.monotonic() - start

    assert failures == []
    successes = sum(done)
    assert successes == p.forwarded
    assert successes / elapsed >= 0.75 * 50
    steady_throttled = p.throttled - warm_throttled
    steady_forwarded = p.forwarded - warm_forwarded
    assert steady_throttled <= 0.1 * (steady_throttled + steady_forwarded)
