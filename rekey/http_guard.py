"""The hardened HTTP server both local servers use (the enclave agent, the codec server).

A stdlib ``ThreadingHTTPServer`` that cannot be exhausted by clients that open connections and
say nothing, trickle their headers, or send bodies of unbounded or unreadable length:

* every read has an idle timeout and every connection a whole-request deadline;
* until the handler has *authenticated* the request (``trust``), a connection has only
  ``auth_timeout`` seconds for its request line and headers, and it is the first to go: when all
  ``max_connections`` slots are taken, a new connection takes the slot of the oldest connection
  not yet authenticated (which is dropped); only when every slot serves an authenticated request
  is the new one answered 503 at once, without blocking the accept loop. So anonymous clients,
  however many, cannot keep an authenticated caller out, and threads stay bounded;
* the request line and headers are capped in size and count (431 past the cap);
* one connection carries one request (``Connection: close``);
* a body needs exactly one plain decimal ``Content-Length`` within the limit, and
  ``Transfer-Encoding`` is refused (:func:`declared_length`), so nothing is read past the limit and
  a proxy in front reads a request as the server does.

A single watchdog thread enforces the deadlines (no timer thread per connection).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import socket
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
_DECIMAL = re.compile(r"[0-9]{1,20}")
_WATCH_INTERVAL = 0.1


@dataclass(frozen=True)
class GuardLimits:
    max_body: int = MAX_BODY
    max_connections: int = 32
    idle_timeout: float = 10.0
    """Seconds a connection may stay silent (each read)."""
    request_timeout: float = 60.0
    """Seconds a whole request may take, however slowly it trickles in (slowloris)."""
    auth_timeout: float = 2.0
    """Seconds for the request line and headers to arrive and be authenticated."""
    max_header_bytes: int = 32 * 1024
    """Request line plus headers."""
    max_headers: int = 64


class Refused(Exception):
    """A request refused before it is served: the status, an error type, a message; ``drain``
    says whether a small body may be read and dropped so the client sees the answer."""

    def __init__(self, status: HTTPStatus, type_: str, message: str, *, drain: bool = True) -> None:
        super().__init__(message)
        self.status, self.type, self.drain = status, type_, drain


def one_header(headers: Message, name: str) -> str | None:
    values = headers.get_all(name) or []
    if len(values) > 1:
        raise Refused(HTTPStatus.BAD_REQUEST, "BadRequest", f"more than one {name} header", drain=False)
    return values[0] if values else None


def declared_length(headers: Message, max_body: int) -> int | None:
    """The body length a request declares, checked before anything is read; None when absent.

    Refuses (400) ``Transfer-Encoding`` and any ``Content-Length`` that is not one plain decimal
    number (``-1``, ``+5``, ``1_5``, ``0x10``, two headers), and (413) one above ``max_body``."""
    if headers.get_all("Transfer-Encoding"):
        raise Refused(HTTPStatus.BAD_REQUEST, "BadRequest", "Transfer-Encoding is not accepted", drain=False)
    text = one_header(headers, "Content-Length")
    if text is None:
        return None
    if not _DECIMAL.fullmatch(text.strip(" \t")):
        raise Refused(
            HTTPStatus.BAD_REQUEST, "BadRequest", "Content-Length must be a decimal number", drain=False
        )
    length = int(text)
    if length > max_body:
        raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "TooLarge", "body too large", drain=False)
    return length


class _HeaderBudget:
    """The connection's input: ``readline`` (request line and headers) is capped in total bytes
    and lines; ``read`` (the body, whose length is checked separately) passes through."""

    def __init__(self, raw: Any, limits: GuardLimits) -> None:
        self._raw = raw
        self._bytes = limits.max_header_bytes
        self._lines = limits.max_headers + 2  # the request line and the blank line too

    def readline(self, limit: int = -1) -> bytes:
        if self._lines <= 0:
            raise http.client.HTTPException("too many header lines")
        want = self._bytes + 1 if limit < 0 else min(limit, self._bytes + 1)
        line: bytes = self._raw.readline(want)
        self._bytes -= len(line)
        self._lines -= 1
        if self._bytes < 0:
            raise http.client.LineTooLong("request line and headers")
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class GuardedHandler(BaseHTTPRequestHandler):
    """Base handler: timeouts and header caps from the server's limits, one request per
    connection. Subclasses call :meth:`trust` once a request is authenticated."""

    server: GuardedHTTPServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.idle_timeout)
        self.rfile, self.wfile = self.server.wrap_streams(self.connection, self.rfile, self.wfile)
        self.rfile = _HeaderBudget(self.rfile, self.server.limits)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (http.client.HTTPException, OSError):  # request line past the cap, or dropped
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        super().send_response(code, message)
        self.send_header("Connection", "close")  # also sets close_connection

    def trust(self) -> bool:
        """Mark this connection authenticated: no header deadline, never evicted for a newcomer.
        False if it was already evicted or dropped (the handler should stop)."""
        return self.server.trust(self.connection)


@dataclass
class _Connection:
    started: float
    trusted: bool = False
    ended: bool = False
    """Dropped at a deadline or evicted."""


def _drop(connection: socket.socket) -> None:
    """End a connection: the handler's blocked read returns at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


def busy_answer(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (
        b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )


class GuardedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``limits.max_connections`` at once (see the module)."""

    daemon_threads = True
    request_queue_size = 128  # a flood of connects is accepted (and evicted), not left in SYN retries
    busy = busy_answer({"error": {"type": "Busy", "message": "too many connections"}})

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: GuardLimits
    ) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}
        self._slots_used = 0
        self._closing = threading.Event()
        super().__init__(address, handler)
        self._watchdog = threading.Thread(target=self._watch, name="http-guard-watchdog", daemon=True)
        self._watchdog.start()

    def wrap_streams(self, connection: socket.socket, rfile: Any, wfile: Any) -> tuple[Any, Any]:
        """The handler's input and output for ``connection`` (a TLS server wraps them)."""
        return rfile, wfile

    # -- admission ----------------------------------------------------------------------

    def process_request(self, request: Any, client_address: Any) -> None:
        victim: socket.socket | None = None
        with self._lock:
            admitted = self._slots_used < self.limits.max_connections
            if admitted:
                self._slots_used += 1
            else:
                victim = next((s for s, c in self._connections.items() if not c.trusted), None)
                if victim is not None:  # the newcomer takes the slot of the oldest anonymous one
                    self._connections.pop(victim).ended = True
                    admitted = True
            if admitted:
                self._connections[request] = _Connection(time.monotonic())
        if victim is not None:
            _drop(victim)
        if not admitted:
            self.refuse_busy(request)
            return
        try:
            threading.Thread(
                target=self._serve, args=(request, client_address), name="http-guard", daemon=True
            ).start()
        except BaseException:
            self._release(request)
            self.shutdown_request(request)
            raise

    def refuse_busy(self, request: socket.socket) -> None:
        """Answer ``busy`` and close, never blocking the accept loop."""
        try:  # best effort, never blocking the accept loop
            request.setblocking(False)
            with contextlib.suppress(OSError):
                request.recv(65536)  # what already arrived, so closing sends no reset
            request.send(self.busy)
        except OSError:
            pass
        self.shutdown_request(request)

    def _serve(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._release(request)
            self.shutdown_request(request)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            if self._connections.pop(request, None) is not None:  # evicted ones gave their slot away
                self._slots_used -= 1

    def trust(self, request: socket.socket) -> bool:
        with self._lock:
            connection = self._connections.get(request)
            if connection is None or connection.ended:
                return False
            connection.trusted = True
            return True

    # -- deadlines ----------------------------------------------------------------------

    def _watch(self) -> None:
        limits = self.limits
        while not self._closing.wait(_WATCH_INTERVAL):
            now = time.monotonic()
            late = []
            with self._lock:
                for request, connection in self._connections.items():
                    age = now - connection.started
                    if connection.ended:
                        continue
                    if age > limits.request_timeout or (not connection.trusted and age > limits.auth_timeout):
                        connection.ended = True  # it keeps its slot until its thread ends
                        late.append(request)
            for request in late:
                _drop(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or was dropped at its deadline; no traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
