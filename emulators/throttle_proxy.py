"""A throttling reverse proxy: a KMS emulator that "throttles like the real thing".

Put it in front of a backend that never throttles (moto's KMS, for one) and it forwards every
request unless its token bucket (``rate`` tokens/s, ``burst`` tokens, default ``max(1, rate/10)``,
starting full) is empty, in which case it answers with the backend's own throttle response and
the request never reaches the backend:

``aws``
    HTTP 400, ``x-amzn-ErrorType: ThrottlingException``, ``Content-Type:
    application/x-amz-json-1.1``, body ``{"__type":"ThrottlingException","message":"Rate
    exceeded"}``. KMS speaks botocore's ``json`` protocol, whose error parser takes the code
    from the body's ``__type`` (the ``x-amzn-ErrorType`` header is what the ``rest-json``
    parser reads; both are sent, as AWS does); any status >= 300 is parsed as an error, so the
    client raises ``ClientError`` with ``Error.Code == "ThrottlingException"``, which botocore's
    retry handlers (legacy, standard and adaptive) classify as throttling.
``azure``
    HTTP 429, ``{"error":{"code":"Throttled","message":...}}`` (Key Vault / Managed HSM).
``vault``
    HTTP 429, ``{"errors":["request path \\"...\\": rate limit quota exceeded"]}`` (OpenBao's
    rate-limit quota).

With ``operations`` (a set of AWS operation names, e.g. :data:`KMS_CRYPTO_OPERATIONS`) only requests
whose ``X-Amz-Target`` names one of them (``TrentService.Encrypt`` -> ``Encrypt``) take a token;
the others are forwarded unmetered (AWS KMS meters its operations in separate quotas: the shared
symmetric-cryptography quota is the one a rotation meets).

With ``retry_after=True`` a throttle response also carries ``Retry-After`` (whole seconds, at
least 1, until the bucket has a token again); by default it does not (AWS never sends it and
Key Vault does not always).

The proxy is a stdlib ``ThreadingHTTPServer`` speaking HTTP/1.1 with keep-alive on 127.0.0.1;
each client connection has its own keep-alive connection to the backend; both sockets have
``TCP_NODELAY`` set (small answers are not held back by Nagle's algorithm). Request and response
bodies are buffered whole (fine for KMS-sized messages); hop-by-hop headers are dropped and the
client's ``Host`` is passed through unchanged, so SigV4 signatures stay as the client made
them. A request that fails on a reused backend connection the backend had closed is sent once
more on a fresh one. The backend must be ``http://``.

In-process::

    with ThrottleProxy("http://127.0.0.1:5000", rate=50, profile="aws") as proxy:
        client = boto3.client("kms", endpoint_url=proxy.url, ...)
        ...
        proxy.stats()  # {"forwarded": ..., "throttled": ..., "unmetered": ..., "backend_errors": ..., ...}

Standalone (serves until SIGTERM or Ctrl-C, then prints the counters)::

    python -m emulators.throttle_proxy --backend http://127.0.0.1:5000 --rate 50 --port 8080 \\
        [--burst 5] [--profile aws|azure|vault] [--retry-after] [--kms-crypto | --operation OP ...]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import urlsplit

PROFILES = ("aws", "azure", "vault")

#: The operations of AWS KMS's shared "cryptographic operations (symmetric) request rate" quota.
KMS_CRYPTO_OPERATIONS = frozenset(
    {
        "Decrypt",
        "Encrypt",
        "GenerateDataKey",
        "GenerateDataKeyWithoutPlaintext",
        "GenerateMac",
        "GenerateRandom",
        "ReEncrypt",
        "VerifyMac",
    }
)

# Not forwarded in either direction (RFC 9110 7.6.1), plus what the proxy sets itself.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
    }
)
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class TokenBucket:
    """``rate`` tokens per second into a bucket of ``burst`` tokens, starting full. Thread-safe."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rate = 0.0
        self._burst = 1.0
        self._tokens = 0.0
        self._last = clock()
        self.configure(rate, burst)
        self._tokens = self._burst if self._rate > 0 else 0.0

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    def configure(self, rate: float, burst: float | None = None) -> None:
        """Change the rate (and burst; default ``max(1, rate / 10)``), keeping the tokens earned so far.

        ``math.inf``: no limit; 0: refuse everything (the bucket is emptied)."""
        if rate < 0:
            raise ValueError("rate must be >= 0")
        if burst is None:
            burst = max(1.0, rate / 10.0) if math.isfinite(rate) else 1.0
        if burst < 1:
            raise ValueError("burst must be >= 1")
        with self._lock:
            self._refill()
            self._rate = float(rate)
            self._burst = float(burst)
            self._tokens = min(self._tokens, self._burst) if self._rate > 0 else 0.0

    def drain(self) -> None:
        """Empty the bucket now."""
        with self._lock:
            self._refill()
            self._tokens = 0.0

    def take(self) -> float:
        """Take a token: 0.0 if there was one, else the seconds until there will be one (inf at rate 0)."""
        with self._lock:
            if math.isinf(self._rate):
                return 0.0
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            if self._rate == 0:
                return math.inf
            return (1.0 - self._tokens) / self._rate

    def _refill(self) -> None:
        now = self._clock()
        if math.isfinite(self._rate):
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now


def throttle_response(
    profile: str, path: str, wait: float, retry_after: bool
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of the backend's own "slow down" answer."""
    request_id = str(uuid.uuid4())
    if profile == "aws":
        status = 400
        headers = [
            ("Content-Type", "application/x-amz-json-1.1"),
            ("x-amzn-ErrorType", "ThrottlingException"),
            ("x-amzn-RequestId", request_id),
        ]
        body: dict[str, Any] = {"__type": "ThrottlingException", "message": "Rate exceeded"}
    elif profile == "azure":
        status = 429
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("x-ms-request-id", request_id),
        ]
        body = {
            "error": {
                "code": "Throttled",
                "message": "Request was not processed because too many requests were received.",
            }
        }
    elif profile == "vault":
        status = 429
        headers = [("Content-Type", "application/json")]
        api_path = urlsplit(path).path.removeprefix("/v1/")
        body = {"errors": [f'request path "{api_path}": rate limit quota exceeded']}
    else:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if retry_after:
        seconds = 60 if not math.isfinite(wait) else max(1, math.ceil(wait))
        headers.append(("Retry-After", str(seconds)))
    return status, headers, json.dumps(body, separators=(",", ":")).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # an idle client connection is closed after this long
    # TCP_NODELAY on the client's socket: an answer is written as headers then body, and with
    # Nagle on the body waited for the client's delayed ACK (~40 ms) on every keep-alive request
    # (moto's ReEncrypt through the proxy: 323/s with Nagle, 454/s without). The backend side is
    # set by http.client itself (HTTPConnection.connect sets TCP_NODELAY).
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._backend: http.client.HTTPConnection | None = None
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            if self._backend is not None:
                self._backend.close()
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        proxy = self.server.proxy
        body = self._read_body()
        if body is None:
            self._reply(400, [("Content-Type", "text/plain")], b"unreadable request body\n")
            self.close_connection = True
            return
        metered = proxy.metered(self.headers.get("X-Amz-Target", ""))
        wait = proxy.bucket.take() if metered else 0.0
        if wait > 0:
            proxy._count("throttled")
            status, headers, payload = throttle_response(proxy.profile, self.path, wait, proxy.retry_after)
            self._reply(status, headers, payload)
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except (OSError, http.client.HTTPException) as exc:
            proxy._count("backend_errors")
            self._reply(502, [("Content-Type", "text/plain")], f"backend unreachable: {exc}\n".encode())
            return
        proxy._count("forwarded")
        if not metered:
            proxy._count("unmetered")
        self._reply(status, headers, payload, reason=reason)

    do_POST = do_GET
    do_PUT = do_GET
    do_PATCH = do_GET
    do_DELETE = do_GET
    do_HEAD = do_GET
    do_OPTIONS = do_GET

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    return None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)
        length = self.headers.get("Content-Length")
        if length is None:
            return b""
        try:
            n = int(length)
        except ValueError:
            return None
        data = self.rfile.read(n) if n > 0 else b""
        return data if len(data) == n else None

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.append(("Host", proxy.backend_netloc))
        for attempt in range(2):
            if self._backend is None:
                self._backend = http.client.HTTPConnection(
                    proxy.backend_host, proxy.backend_port, timeout=proxy.backend_timeout
                )
            conn = self._backend
            reused = conn.sock is not None
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in headers:
                    conn.putheader(key, value)
                if body or self.command in ("POST", "PUT", "PATCH"):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                response = conn.getresponse()
                payload = response.read()
                return response.status, response.reason, response.getheaders(), payload
            except _STALE_CONNECTION:
                conn.close()
                if not reused or attempt:
                    raise
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")

    def _reply(
        self, status: int, headers: list[tuple[str, str]], payload: bytes, reason: str | None = None
    ) -> None:
        self.send_response_only(status, reason)
        no_body = self.command == "HEAD" or status in (204, 304) or 100 <= status < 200
        for key, value in headers:
            lower = key.lower()
            if lower in _HOP_BY_HOP and not (no_body and lower == "content-length"):
                continue
            self.send_header(key, value)
        if not no_body:
            self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not no_body:
            self.wfile.write(payload)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], proxy: ThrottleProxy) -> None:
        self.proxy = proxy
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def close_connections(self) -> None:
        with self._connections_lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-request is not news


class ThrottleProxy:
    """A throttling reverse proxy on 127.0.0.1 in front of ``backend_url`` (see the module doc)."""

    def __init__(
        self,
        backend_url: str,
        *,
        rate: float,
        burst: float | None = None,
        profile: str = "aws",
        retry_after: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        backend_timeout: float = 30.0,
        operations: Collection[str] | None = None,
    ) -> None:
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        parts = urlsplit(backend_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"backend must be an http:// URL, not {backend_url!r}")
        self.backend_url = backend_url
        self.backend_host = parts.hostname
        self.backend_port = parts.port or 80
        self.backend_netloc = parts.netloc
        self.backend_timeout = backend_timeout
        self.profile = profile
        self.retry_after = retry_after
        self.bucket = TokenBucket(rate, burst)
        #: Only these ``X-Amz-Target`` operations are throttled (None: every request).
        self.operations = frozenset(operations) if operations is not None else None
        self._address = (host, port)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counts = {"forwarded": 0, "throttled": 0, "unmetered": 0, "backend_errors": 0}

    # -- lifecycle

    def start(self) -> str:
        """Start serving in a background thread; returns the proxy's URL."""
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="throttle-proxy",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop accepting, close open client connections, and wait for the server thread."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ThrottleProxy:
        if self._server is None:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._address[0]}:{self.port}"

    # -- control and counters

    def metered(self, target: str) -> bool:
        """Whether a request with this ``X-Amz-Target`` header takes a token."""
        if self.operations is None:
            return True
        return target.rpartition(".")[2] in self.operations

    def set_rate(self, rate: float, burst: float | None = None) -> None:
        """Change the limit of a running proxy (``math.inf``: no limit; 0: throttle everything)."""
        self.bucket.configure(rate, burst)

    def drain(self) -> None:
        """Empty the bucket: the next request is throttled (unless the rate is unlimited)."""
        self.bucket.drain()

    @property
    def forwarded(self) -> int:
        return self._counts["forwarded"]

    @property
    def throttled(self) -> int:
        return self._counts["throttled"]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return {
            **counts,
            "rate": self.bucket.rate,
            "burst": self.bucket.burst,
            "profile": self.profile,
            "operations": sorted(self.operations) if self.operations is not None else None,
        }

    def reset_stats(self) -> None:
        with self._lock:
            for key in self._counts:
                self._counts[key] = 0

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m emulators.throttle_proxy", description="A throttling reverse proxy on 127.0.0.1."
    )
    parser.add_argument(
        "--backend", required=True, help="backend URL, e.g. http://127.0.0.1:5000 (moto_server)"
    )
    parser.add_argument("--rate", type=float, required=True, help="requests per second let through")
    parser.add_argument("--burst", type=float, default=None, help="bucket size (default max(1, rate/10))")
    parser.add_argument("--profile", choices=PROFILES, default="aws")
    parser.add_argument("--retry-after", action="store_true", help="send Retry-After with throttle responses")
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--kms-crypto",
        action="store_true",
        help="throttle only AWS KMS's shared symmetric-cryptography operations (Encrypt, Decrypt, "
        "ReEncrypt, GenerateDataKey, ...); forward the rest unmetered",
    )
    only.add_argument(
        "--operation",
        action="append",
        metavar="OP",
        help="throttle only this X-Amz-Target operation (repeatable); forward the rest unmetered",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="listening port (default: a free one)")
    args = parser.parse_args(argv)
    if math.isnan(args.rate) or args.rate < 0:
        parser.error(f"--rate must be a number >= 0 (inf: no limit), not {args.rate:g}")
    operations = KMS_CRYPTO_OPERATIONS if args.kms_crypto else args.operation

    proxy = ThrottleProxy(
        args.backend,
        rate=args.rate,
        burst=args.burst,
        profile=args.profile,
        retry_after=args.retry_after,
        host=args.host,
        port=args.port,
        operations=operations,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    url = proxy.start()
    print(
        f"throttle proxy {url} -> {args.backend} "
        f"({args.profile}, {proxy.bucket.rate:g}/s, burst {proxy.bucket.burst:g})",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        proxy.stop()
        print(json.dumps(proxy.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
