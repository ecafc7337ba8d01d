"""Attacks on the codec server's connection handling (issue 12, open review findings), in-process
on a free 127.0.0.1 port: half-open connections by the hundred, a slow header sender, a flood
of headers; and the Bearer scheme name in another case (RFC 7235)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rekey.codec_server import CodecServer, serve_codec, server_token_path

pytestmark = pytest.mark.integration

EMPTY = b'{"payloads": []}'


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(home: Path) -> Iterator[CodecServer]:
    codec = serve_codec(home, 0)  # the default limits
    yield codec
    codec.stop()


def _token(home: Path) -> str:
    return server_token_path(home).read_text().strip()


def _encode(server: CodecServer, authorization: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/encode",
        content=EMPTY,
        headers={"Content-Type": "application/json", "Authorization": authorization},
        timeout=30,
    )


def _dropped(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    with contextlib.suppress(OSError):
        sock.recv(65536)
    return True


def test_hundreds_of_idle_connections_neither_grow_threads_nor_keep_a_caller_out(
    server: CodecServer, home: Path
) -> None:
    """400 half-open connections (the review's attack grew the server to 2.3 GB): the server
    keeps at most max_connections threads and the token holder is still served."""
    before = threading.active_count()
    idle = []
    try:
        for index in range(400):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            if index % 2:
                sock.sendall(b"POST /decode HTTP/1.1\r\n")  # and nothing more
            idle.append(sock)
        response = _encode(server, f"Bearer {_token(home)}")  # accepted after all 400
        assert response.status_code == 200 and response.json() == {}
        grown = threading.active_count() - before
        assert grown <= 32 + 2, f"{grown} threads for 400 idle connections"
    finally:
        for sock in idle:
            sock.close()


def test_slow_header_sender_is_dropped(server: CodecServer) -> None:
    request = f"POST /decode HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nX-Padding: {'a' * 600}".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        dropped = False
        for byte in request:  # one byte every 0.1 s: never silent for long, never finishing
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                dropped = True
            if dropped or _dropped(sock):
                dropped = True
                break
            time.sleep(0.1)
        assert dropped, "a client trickling its headers one byte at a time kept its connection"


def test_header_flood_is_refused(server: CodecServer, home: Path) -> None:
    headers = {f"X-Filler-{index}": "x" for index in range(80)}
    response = httpx.post(
        f"{server.url}/encode",
        content=EMPTY,
        headers=headers | {"Content-Type": "application/json", "Authorization": f"Bearer {_token(home)}"},
        timeout=30,
    )
    assert response.status_code == 431
    big = {"X-Filler": "x" * 40_000}
    response = httpx.post(
        f"{server.url}/encode",
        content=EMPTY,
        headers=big | {"Content-Type": "application/json", "Authorization": f"Bearer {_token(home)}"},
        timeout=30,
    )
    assert response.status_code == 431


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_matched_in_any_case(server: CodecServer, home: Path, scheme: str) -> None:
    assert _encode(server, f"{scheme} {_token(home)}").status_code == 200
    assert _encode(server, f"{scheme} {_token(home)[:-1]}").status_code == 401
    assert _encode(server, f"Basic {_token(home)}").status_code == 401


def test_codec_token_swapped_for_a_symlink_is_refused(home: Path, tmp_path: Path) -> None:
    serve_codec(home, 0).stop()  # creates the token
    path = server_token_path(home)
    planted = tmp_path / "planted"
    planted.write_text("attacker-chosen-token-0123456789abcdef\n")
    planted.chmod(0o600)
    path.unlink()
    path.symlink_to(planted)
    from rekey.codec import CodecError

    with pytest.raises(CodecError, match="symlink"):
        serve_codec(home, 0)
