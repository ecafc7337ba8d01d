"""Attacks on the codec server's connection handling (issue 12, open review findings), in-process
on a free 127.0.0.1 port: half-open connections by the hundred, a slow header sender, a flood
of headers; the Bearer scheme name in another case (RFC 7235); a port squatter that captures a
token while the server is down, and /encode without --allow-encode."""

from __future__ import annotations

import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rekey.codec import CodecError
from rekey.codec_server import (
    CodecServer,
    read_server_token,
    serve_codec,
    server_token_path,
    write_server_token,
)
from tests.fixtures.slow_client import trickle_until_dropped

pytestmark = pytest.mark.integration

EMPTY = b'{"payloads": []}'


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def server(home: Path) -> Iterator[CodecServer]:
    codec = serve_codec(home, 0, allow_encode=True)  # the default limits
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
    assert trickle_until_dropped(server.port, request), (
        "a client trickling its headers one byte at a time kept its connection"
    )


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


def _decode(server: CodecServer, token: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/decode",
        content=EMPTY,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_codec_token_swapped_for_a_symlink_is_never_trusted(home: Path, tmp_path: Path) -> None:
    """Attack: the token path is a symlink to a file with a token the attacker knows. A client
    refuses to read it; a starting server replaces the link (not its target) with its own token
    and refuses the planted one."""
    serve_codec(home, 0).stop()  # creates the codec directory
    path = server_token_path(home)
    planted = tmp_path / "planted"
    planted_token = "attacker-chosen-token-0123456789abcdef"
    planted.write_text(planted_token + "\n")
    planted.chmod(0o600)
    path.symlink_to(planted)
    with pytest.raises(CodecError, match="symlink"):
        read_server_token(home)
    server = serve_codec(home, 0)
    try:
        assert not path.is_symlink() and path.is_file()
        assert planted.read_text() == planted_token + "\n"  # the link was replaced, not followed
        assert _decode(server, planted_token).status_code == 401
        assert _decode(server, read_server_token(home)).status_code == 200
    finally:
        server.stop()


def test_no_token_to_send_while_the_server_is_down(home: Path) -> None:
    """Attack (port squatter, issue 12 review finding A): another local user binds the codec
    server's port while it is stopped and logs the Authorization headers clients send. After stop
    the token file is gone, so a client that reads it (the dev stack's probe, `--codec-auth "Bearer
    $(cat ...)"`) has nothing to send."""
    server = serve_codec(home, 0)
    token_file = server_token_path(home)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert _decode(server, read_server_token(home)).status_code == 200
    server.stop()
    assert not token_file.exists()
    with pytest.raises(CodecError, match="is the codec server running"):
        read_server_token(home)


def test_a_token_captured_before_a_restart_is_refused(home: Path) -> None:
    """Attack: the squatter captured the token a client sent while the server was down (here:
    the token of the server that ran before); the server comes back on the same port with a new
    token, and the captured one gets 401 on /decode and /encode."""
    first = serve_codec(home, 0, allow_encode=True)
    port = first.port
    captured = read_server_token(home)
    first.stop()
    second = serve_codec(home, port, allow_encode=True)
    try:
        fresh = read_server_token(home)
        assert fresh != captured
        assert _decode(second, captured).status_code == 401
        assert _encode(second, f"Bearer {captured}").status_code == 401
        assert _decode(second, fresh).status_code == 200
        assert _encode(second, f"Bearer {fresh}").status_code == 200
    finally:
        second.stop()


def test_a_stale_token_left_by_a_killed_server_is_replaced_and_refused(home: Path) -> None:
    """A server killed without cleaning up (SIGKILL) leaves its token; the next start replaces it
    and refuses it."""
    stale = "stale-token-of-a-killed-server-0123456789abcdef"
    serve_codec(home, 0).stop()
    write_server_token(home, stale)
    server = serve_codec(home, 0)
    try:
        assert read_server_token(home) != stale
        assert _decode(server, stale).status_code == 401
    finally:
        server.stop()


def test_stop_leaves_a_token_another_server_wrote(home: Path) -> None:
    first = serve_codec(home, 0)
    second = serve_codec(home, 0)  # the file holds the second's token now
    first.stop()
    try:
        assert _decode(second, read_server_token(home)).status_code == 200
    finally:
        second.stop()
    assert not server_token_path(home).exists()


def test_encode_is_refused_unless_allowed(home: Path) -> None:
    """Attack: a token holder (or whoever captured a token) forges payloads through /encode that
    workers accept. Without allow_encode (`--allow-encode`) /encode answers 403 and encodes
    nothing; /decode still serves."""
    body = b'{"payloads": [{"metadata": {"encoding": "anNvbi9wbGFpbg=="}, "data": "eyJrIjoxfQ=="}]}'
    server = serve_codec(home, 0)
    try:
        token = read_server_token(home)
        refused = httpx.post(
            f"{server.url}/encode",
            content=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert refused.status_code == 403
        assert "--allow-encode" in refused.json()["error"]
        assert "payloads" not in refused.json()
        assert _encode(server, "Bearer nope-" + "x" * 40).status_code == 401  # no hint without the token
        assert _decode(server, token).status_code == 200
    finally:
        server.stop()
    allowed = serve_codec(home, 0, allow_encode=True)
    try:
        authorization = f"Bearer {read_server_token(home)}"
        encoded = httpx.post(
            f"{allowed.url}/encode",
            content=body,
            headers={"Content-Type": "application/json", "Authorization": authorization},
            timeout=30,
        )
        assert encoded.status_code == 200
        assert len(encoded.json()["payloads"]) == 1
    finally:
        allowed.stop()
