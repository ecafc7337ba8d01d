"""Which transport failures may have been applied (``AnswerLost``) and which were never sent (a
plain ``Unavailable``), for each SDK, with the SDKs' own exceptions from real loopback sockets:
a port nobody listens on, and a server that reads the request and then hangs up or answers 500."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import boto3
import hvac
import pytest
from azure.core.exceptions import (
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from botocore.config import Config

from kms_adapters.aws_errors import map_aws_error
from kms_adapters.azure_hsm import map_azure_error
from kms_adapters.errors import AnswerLost, Throttled, Unavailable
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from tests.fixtures.ports import free_port


class HangUp:
    """Reads each HTTP request, counts it, then closes the connection (or answers ``status``)."""

    def __init__(self, status: int | None = None) -> None:
        self.status = status
        self.requests = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)  # a client that never sends must not hold this thread
                data = b""
                while b"\r\n\r\n" not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    data += chunk
                if not data:
                    continue
                self.requests += 1
                if self.status is not None:
                    body = b'{"errors":["boom"]}'
                    conn.sendall(
                        b"HTTP/1.1 %d Oops\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                        b"Connection: close\r\n\r\n%s" % (self.status, len(body), body)
                    )

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def hang_up() -> Iterator[HangUp]:
    server = HangUp()
    yield server
    server.close()


def _vault(url: str, attempts: int = 3) -> VaultTransitAdapter:
    governor = Governor(f"g-{url}", max_attempts=attempts, sleep=lambda _s: None)
    return VaultTransitAdapter(
        hvac.Client(url=url, token="t", timeout=5),
        "k",
        release_store=MemoryReleasePolicyStore(),
        governor=governor,
    )


def test_vault_a_refused_connection_was_not_sent_and_a_mutation_is_retried() -> None:
    adapter = _vault(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable, match="cannot reach") as refused:
        adapter.rotate()
    assert type(refused.value) is Unavailable
    assert adapter.governor.snapshot().attempts == 3  # resent: nothing had been sent


def test_vault_a_hang_up_after_the_request_is_an_answer_lost_never_resent(hang_up: HangUp) -> None:
    adapter = _vault(hang_up.url)
    with pytest.raises(AnswerLost, match="may have been applied"):
        adapter.rotate()
    assert hang_up.requests == 1


def test_vault_a_read_is_still_retried_after_a_lost_answer(hang_up: HangUp) -> None:
    adapter = _vault(hang_up.url)
    with pytest.raises(AnswerLost):
        adapter.describe()
    assert hang_up.requests == 3


@pytest.mark.parametrize("status", [500, 502, 503])
def test_vault_a_5xx_to_a_mutation_is_an_answer_lost_never_resent(status: int) -> None:
    server = HangUp(status)
    try:
        with pytest.raises(AnswerLost):
            _vault(server.url).rotate()
        assert server.requests == 1
    finally:
        server.close()


def test_vault_a_429_to_a_mutation_is_resent() -> None:
    calls: list[int] = []

    def rotate_key(**_kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise hvac.exceptions.RateLimitExceeded("rate limit quota exceeded")

    client = SimpleNamespace(
        url="http://127.0.0.1:1",
        secrets=SimpleNamespace(
            transit=SimpleNamespace(
                rotate_key=rotate_key,
                read_key=lambda **_: {"data": {"latest_version": 2, "type": "aes256-gcm96"}},
            )
        ),
    )
    governor = Governor("stub-429", sleep=lambda _s: None)
    adapter = VaultTransitAdapter(client, "k", release_store=MemoryReleasePolicyStore(), governor=governor)  # type: ignore[arg-type]
    assert adapter.rotate().primary_version == 2 and len(calls) == 2


def _kms(url: str) -> Any:
    return boto3.session.Session().client(
        "kms",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=5),
    )


def test_aws_a_refused_connection_was_not_sent() -> None:
    with pytest.raises(Exception) as caught:
        _kms(f"http://127.0.0.1:{free_port()}").create_key()
    mapped = map_aws_error(caught.value, "create_key", "aws:k")
    assert type(mapped) is Unavailable


def test_aws_a_hang_up_after_the_request_may_have_been_applied(hang_up: HangUp) -> None:
    with pytest.raises(Exception) as caught:
        _kms(hang_up.url).create_key()
    mapped = map_aws_error(caught.value, "create_key", "aws:k")
    assert type(mapped) is AnswerLost and "may have been applied" in str(mapped)
    assert hang_up.url not in str(mapped)


def _http_error(status: int) -> HttpResponseError:
    response = SimpleNamespace(status_code=status, reason="x", headers={}, text=lambda: "", content_type="")
    return HttpResponseError(response=response)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ServiceRequestError("connection refused"), Unavailable),
        (ServiceRequestTimeoutError("connect timeout"), Unavailable),
        (ServiceResponseError("connection reset after sending"), AnswerLost),
        (ServiceResponseTimeoutError("read timeout"), AnswerLost),
        (_http_error(500), AnswerLost),
        (_http_error(503), AnswerLost),
        (_http_error(429), Throttled),
    ],
)
def test_azure_classes(exc: Exception, expected: type[Exception]) -> None:
    assert type(map_azure_error(exc, "rotate key", "azure:k")) is expected
