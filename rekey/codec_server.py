"""Codec server: lets the Temporal UI (and ``temporal`` CLI) show rekey's encrypted payloads.

Temporal's remote codec protocol: ``POST /encode`` and ``POST /decode`` take and return
``{"payloads": [...]}``, the protobuf JSON form of ``temporalio.api.common.v1.Payloads``
(metadata values and data base64). The UI calls it from the browser, so the server answers
CORS preflights for the configured UI origins. Point the dev server at it with
``temporal server start-dev --ui-codec-endpoint http://127.0.0.1:<port>``.

Whoever can reach this server can decrypt every payload, so it binds 127.0.0.1 only,
rejects requests whose ``Origin`` is not an allowed UI origin, and rejects ``Host``
headers other than its own loopback address (DNS rebinding). Payload contents are never
logged.
"""

from __future__ import annotations

import http.server
import json
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import ClassVar

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from rekey.codec import CodecError, EncryptionCodec, Keyring, codec_keys_path, load_or_create_codec_keys

log = logging.getLogger(__name__)

DEFAULT_CORS_ORIGINS = ("http://127.0.0.1:8233", "http://localhost:8233")
DEFAULT_PORT = 8234
MAX_BODY_BYTES = 64 * 1024 * 1024
ALLOW_HEADERS = "content-type, x-namespace"
BIND_HOST = "127.0.0.1"


class _CodecHandler(http.server.BaseHTTPRequestHandler):
    """Request handler; :func:`make_codec_app` binds ``codec`` and ``cors_origins``."""

    codec: ClassVar[EncryptionCodec]
    cors_origins: ClassVar[frozenset[str]]
    server_version = "rekey-codec"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    # -- helpers -----------------------------------------------------------------------

    def _origin(self) -> str | None:
        return self.headers.get("Origin")

    def _origin_allowed(self) -> bool:
        origin = self._origin()
        return origin is None or origin in self.cors_origins

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host")
        if host is None:
            return True  # HTTP/1.0 client without Host: not a browser
        port = getattr(self.server, "server_port", None)
        return host in {f"127.0.0.1:{port}", f"localhost:{port}"}

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        origin = self._origin()
        if origin is not None and origin in self.cors_origins:
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Access-Control-Allow-Methods", "POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", ALLOW_HEADERS)
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Vary", "Origin")
        self.send_header("Cache-Control", "no-store")
        if body:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode())

    def _guard(self) -> bool:
        if not self._host_allowed():
            self._error(403, "unexpected Host header")
            return False
        if not self._origin_allowed():
            self._error(403, "origin not allowed")
            return False
        return True

    # -- verbs -------------------------------------------------------------------------

    def do_OPTIONS(self) -> None:
        if self._guard():
            self._send(204)

    def do_POST(self) -> None:
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else -1
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(411, "Content-Length required")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, f"body larger than {MAX_BODY_BYTES} bytes")
            return
        body = self.rfile.read(length)
        if not self._guard():
            return
        transform: Callable[[Sequence[Payload]], list[Payload]]
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/encode":
            transform = self.codec.encode_sync
        elif path == "/decode":
            transform = self.codec.decode_sync
        else:
            self._error(404, "not found; use POST /encode or POST /decode")
            return
        try:
            payloads = json_format.Parse(body, Payloads(), ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError) as err:
            self._error(400, f"body is not {{'payloads': [...]}} in Temporal's JSON form: {err}")
            return
        try:
            out = Payloads(payloads=transform(payloads.payloads))
        except CodecError as err:
            self._error(422, str(err))
            return
        self._send(200, json_format.MessageToJson(out, indent=None).encode())

    def do_GET(self) -> None:
        if self._guard():
            self._error(405, "use POST /encode or POST /decode")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def make_codec_app(
    keyring: Keyring, *, cors_origins: Sequence[str] = DEFAULT_CORS_ORIGINS
) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class serving the codec protocol for ``keyring``."""
    return type(
        "CodecHandler",
        (_CodecHandler,),
        {"codec": EncryptionCodec(keyring), "cors_origins": frozenset(cors_origins)},
    )


class CodecServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    key_id: str = ""
    """Id of the current codec key (what /encode encrypts under)."""

    @property
    def port(self) -> int:
        return self.server_port

    @property
    def url(self) -> str:
        return f"http://{BIND_HOST}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (call from another thread than serve_forever)."""
        self.shutdown()
        self.server_close()


def serve_codec(
    home: Path, port: int = DEFAULT_PORT, cors_origins: Sequence[str] | None = None
) -> CodecServer:
    """Start a codec server for ``<home>``'s keyring on 127.0.0.1:``port`` (0: any free port).

    It serves on a daemon thread; call :meth:`CodecServer.stop` to end it.
    """
    keyring = load_or_create_codec_keys(home)
    handler = make_codec_app(
        keyring, cors_origins=DEFAULT_CORS_ORIGINS if cors_origins is None else cors_origins
    )
    server = CodecServer((BIND_HOST, port), handler)
    server.key_id = keyring.current
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="rekey-codec-server", daemon=True
    ).start()
    return server


def run_codec_server(home: Path, port: int = DEFAULT_PORT, cors_origins: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; prints the URL to give to ``--ui-codec-endpoint``. Returns 0."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = serve_codec(home, port, cors_origins)
        try:
            print(
                f"codec server on {server.url} (keyring {codec_keys_path(home)}, "
                f"current key {server.key_id})",
                flush=True,
            )
            while not stop.wait(1.0):
                pass
        finally:
            server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
