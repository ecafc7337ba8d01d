"""The HTTPS front end: a stdlib ``ThreadingHTTPServer`` behind TLS (HTTP/1.1 keep-alive) on
127.0.0.1, and the dispatcher that turns one request into one answer: body limits, the
``/_emulator/*`` endpoints, the 401 Bearer challenge, the ``api-version`` check, then the router."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

from emulators.azure_keyvault.routes import Router
from emulators.azure_keyvault.throttle import Throttle
from emulators.azure_keyvault.tls import TlsFiles
from emulators.azure_keyvault.wire import ApiError

__all__ = ["DEFAULT_RESOURCE", "DEFAULT_TENANT", "Dispatcher", "EmulatorHttpServer", "server_context"]

#: What the 401 challenge names, like Key Vault's (the SDK checks neither without verification).
DEFAULT_RESOURCE = "https://vault.azure.net"
DEFAULT_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"

_API_VERSION = re.compile(r"(?:7\.[0-9]+|20[0-9]{2}-[0-9]{2}-[0-9]{2})(?:-preview(?:\.[0-9]+)?)?")
_SERVICE_VERSION = "1.9.0.0"
_MAX_BODY = 1 << 20


def server_context(tls: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2 or later with the server certificate ``ensure_tls`` made."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.server_cert, tls.server_key)
    return context


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rekey-azure-keyvault-emulator"
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:
        return

    def do_GET(self) -> None:
        cast(EmulatorHttpServer, self.server).dispatcher.handle(self)

    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET
    do_HEAD = do_GET


class EmulatorHttpServer(ThreadingHTTPServer):
    """The listener on 127.0.0.1; it knows its open connections so ``close_connections`` can end
    keep-alive clients at stop."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, port: int, dispatcher: Dispatcher, context: ssl.SSLContext) -> None:
        self.dispatcher = dispatcher
        self.ssl_context = context
        self._connections: set[ssl.SSLSocket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, not in the accept loop.
        raw = cast(socket.socket, request)
        raw.settimeout(10)
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK stall
        # every keep-alive response by ~40 ms.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn = self.ssl_context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self._conn_lock:
            self._connections.add(conn)
        try:
            _Handler(conn, client_address, self)
        except (ssl.SSLError, OSError):
            pass
        finally:
            with self._conn_lock:
                self._connections.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def close_connections(self) -> None:
        """Shut down every open connection (after ``shutdown()``: no new ones are accepted)."""
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Dispatcher:
    """Answers one HTTP request; counts requests, unauthorised requests and answers by status."""

    def __init__(self, router: Router, throttle: Throttle, *, tenant: str, resource: str) -> None:
        self._router = router
        self._throttle = throttle
        self._challenge = (
            f'Bearer authorization="https://login.microsoftonline.com/{tenant}", resource="{resource}"'
        )

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        method = handler.command
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self._send(handler, ApiError(400, "BadParameter", "bad Content-Length"), close=True)
            return
        body = handler.rfile.read(length) if length else b""
        split = urlsplit(handler.path)
        query = parse_qs(split.query, keep_blank_values=True)
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        self._throttle.count_request()
        if segments and segments[0] == "_emulator":
            try:
                status, answer = self._router.admin(method, segments[1:], body)
            except ApiError as error:
                self._send(handler, error)
                return
            self._send(handler, status, answer)
            return
        auth = handler.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            self._throttle.count_unauthorized()
            unauthorized = ApiError(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                headers={"WWW-Authenticate": self._challenge},
            )
            self._send(handler, unauthorized)
            return
        api_version = (query.get("api-version") or [""])[0]
        host = (
            handler.headers.get("Host") or f"127.0.0.1:{cast(EmulatorHttpServer, handler.server).server_port}"
        )
        base = f"https://{host}"
        self._throttle.begin_answer()
        try:
            if not api_version:
                raise ApiError(
                    400, "BadParameter", "The api-version query parameter (?api-version=) is required."
                )
            if not _API_VERSION.fullmatch(api_version):
                raise ApiError(
                    400, "BadParameter", f"The specified version ({api_version}) is not recognized."
                )
            status, answer = self._router.route(method, segments, query, body, base, api_version)
        except ApiError as error:
            self._delay()
            self._send(handler, error)
            return
        except Exception as exc:  # an emulator bug: answer like a server error, keep serving
            self._send(handler, ApiError(500, "InternalServerError", f"emulator error: {type(exc).__name__}"))
            return
        self._delay()
        self._send(handler, status, answer)

    def _delay(self) -> None:
        """Hold the answer back by the sustained-load latency its class owes (in this request's
        own thread, no lock held: other requests and classes keep flowing)."""
        delay = self._throttle.answer_delay()
        if delay > 0:
            time.sleep(delay)

    def _send(
        self,
        handler: BaseHTTPRequestHandler,
        status: int | ApiError,
        payload: Mapping[str, Any] | None = None,
        *,
        close: bool = False,
    ) -> None:
        headers: dict[str, str] = {}
        if isinstance(status, ApiError):
            payload, headers, status = status.body(), status.headers, status.status
        data = json.dumps(payload).encode() if payload is not None else b""
        self._throttle.count_status(status)
        try:
            handler.send_response(status)
            if payload is not None:
                handler.send_header("Content-Type", "application/json; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.send_header("Cache-Control", "no-cache")
            handler.send_header("x-ms-request-id", str(uuid.uuid4()))
            handler.send_header("x-ms-keyvault-service-version", _SERVICE_VERSION)
            for name, value in headers.items():
                handler.send_header(name, value)
            if close:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
        except OSError:
            handler.close_connection = True
