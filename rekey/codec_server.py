"""Codec server: lets the Temporal UI (and ``temporal`` CLI) show rekey's encrypted payloads.

Temporal's remote codec protocol: ``POST /encode`` and ``POST /decode`` take and return
``{"payloads": [...]}``, the protobuf JSON form of ``temporalio.api.common.v1.Payloads``
(metadata values and data base64). The UI calls it from the browser, so the server answers
CORS preflights for the configured UI origins. Point the dev server at it with
``temporal server start-dev --ui-codec-endpoint http://127.0.0.1:<port>``.

Whoever can call this server can decrypt every payload (and, with ``/encode``, encrypt
payloads workers accept), so ``POST /encode`` and ``POST /decode`` require ``Authorization:
Bearer <token>``, compared in constant time; a request without it gets 401 whatever its
Origin, before its body is read. The token is fresh at every start: the server binds its port
first, then writes the token to ``<home>/codec/server-token`` (0600, under a temporary name and
renamed into place, never following a symlink), and deletes the file when it stops (only if it
still holds this server's token, as the agent does with its tokens in :mod:`rekey.agent_auth`).
So while the server is down there is no token for a client to read and send: a process that
binds the port meanwhile (a port squatter) can capture at most the token of a server that has
stopped, which no later server accepts. A server killed without a chance to clean up (SIGKILL)
leaves its stale token behind; it is worthless, since the next start replaces it. Two servers on
one home each write their own token; the file holds the last one started.

``POST /encode`` is refused (403) unless the server was started with ``allow_encode``
(``rekey codec-server --allow-encode``): the Temporal UI needs only ``/decode``; ``temporal
workflow start --codec-endpoint`` (and ``signal``/``update`` with inputs) needs ``/encode``.
A caller of ``/encode`` makes payloads that workers decode (format 2, refused once
``codec_min_format = 3``), so leave it off unless such a CLI needs it.

The server also binds 127.0.0.1 only, rejects requests whose ``Origin`` is not an
allowed UI origin, and rejects ``Host`` headers other than its own loopback address (DNS
rebinding). CORS preflights (``OPTIONS``) carry no credentials by the browser's rules and
are answered without one; they reveal nothing. Payload contents are never logged.

Connections are guarded by :mod:`rekey.http_guard`, like the agent's: socket timeouts, a short
deadline for the headers until the bearer token is checked, capped headers, at most
``max_connections`` at once (an unauthenticated connection gives its slot to a newcomer first;
503 only when all serve authenticated requests), strict ``Content-Length`` (anything else, or
``Transfer-Encoding``, gets 411 before the body is read). The ``Bearer`` scheme name is matched
in any case (RFC 7235).

``/decode`` returns payloads that are not encrypted unchanged (display only: the reader
could see them anyway); workers refuse them (:class:`rekey.codec.EncryptionCodec`).

Giving the token to the clients:

* ``temporal`` CLI: ``--codec-endpoint http://127.0.0.1:8234 --codec-auth "Bearer $(cat
  <home>/codec/server-token)"``, read while the server runs (the token changes at every start;
  :func:`read_server_token` reads it safely).
* Temporal UI: the UI sends only the *signed-in user's* access token
  (``codec.passAccessToken`` in the UI server config, ``TEMPORAL_CODEC_PASS_ACCESS_TOKEN``,
  or the "pass access token" switch of the UI's codec settings), never a static secret;
  ``temporal server start-dev`` has no UI sign-in at all. Put an authenticating proxy that
  validates the user's token and adds this bearer in front of the codec server. The dev
  stack (``rekey dev up``) points the UI at the codec server, but without such a proxy the
  UI shows payloads as "Encoded" (decode answers 401): decode them with the CLI instead.
"""

from __future__ import annotations

import contextlib
import hmac
import http.server
import json
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import ClassVar

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from rekey.codec import (
    CodecError,
    EncryptionCodec,
    Keyring,
    codec_keys_path,
    load_or_create_codec_keys,
)
from rekey.http_guard import (
    GuardedHandler,
    GuardedHTTPServer,
    GuardLimits,
    Refused,
    busy_answer,
    declared_length,
)
from rekey.logs import register_secret
from sealing.private_file import PrivateFileError, read_private

log = logging.getLogger(__name__)

DEFAULT_CORS_ORIGINS = ("http://127.0.0.1:8233", "http://localhost:8233")
DEFAULT_PORT = 8234
MAX_BODY_BYTES = 64 * 1024 * 1024
ALLOW_HEADERS = "authorization, content-type, x-namespace"
BIND_HOST = "127.0.0.1"
TOKEN_FILE = Path("codec") / "server-token"
TOKEN_BYTES = 32


def server_token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def new_server_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def write_server_token(home: Path, token: str) -> None:
    """Write ``token`` to ``<home>/codec/server-token`` (0600) in place of any earlier one: under
    a temporary name (O_EXCL, never following a symlink), then renamed over the path, so no
    reader sees a partial or a world-readable token."""
    path = server_token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def read_server_token(home: Path) -> str:
    """The running codec server's bearer secret, for a client: read without following a symlink
    and only from a private regular file of ours. :class:`CodecError` if there is none (the
    server is not running) or the file is unsafe."""
    path = server_token_path(home)
    try:  # opened once without following a symlink; checked and read through that descriptor
        token = read_private(path, limit=1024).decode("ascii", errors="replace").strip()
    except FileNotFoundError:
        raise CodecError(f"{path} does not exist: is the codec server running?") from None
    except PrivateFileError as exc:
        raise CodecError(f"{exc} (the token file must be a regular file of ours, chmod 600)") from None
    if len(token) < 32:
        raise CodecError(f"{path} holds a token shorter than 32 characters")
    return token


def remove_server_token(home: Path, token: str) -> None:
    """Delete ``<home>/codec/server-token`` if it still holds ``token`` (a file another codec
    server has since written for itself is left alone)."""
    path = server_token_path(home)
    try:
        current = read_private(path, limit=1024).decode("ascii", errors="replace").strip()
    except (FileNotFoundError, PrivateFileError):
        return
    if hmac.compare_digest(current.encode(), token.encode()):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class _CodecHandler(GuardedHandler):
    """Request handler; :func:`make_codec_app` binds ``codec`` and ``cors_origins``."""

    codec: ClassVar[EncryptionCodec]
    cors_origins: ClassVar[frozenset[str]]
    token: ClassVar[bytes]
    allow_encode: ClassVar[bool]
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

    def _authorized(self) -> bool:
        values = self.headers.get_all("Authorization") or []
        scheme, _, presented = (values[0] if len(values) == 1 else "").strip().partition(" ")
        candidate = presented.strip().encode("latin-1", errors="replace")
        matches = hmac.compare_digest(candidate, self.token)  # the token compared in constant time
        return matches and scheme.lower() == "bearer"  # the scheme name in any case (RFC 7235)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json") -> None:
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="rekey-codec"')
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
        self.close_connection = True
        try:
            length = declared_length(self.headers, MAX_BODY_BYTES)
        except Refused as refused:
            if refused.status == 413:
                self._error(413, f"body larger than {MAX_BODY_BYTES} bytes")
            else:  # a lenient length, two of them, or Transfer-Encoding: as if none was given
                self._error(411, "Content-Length required")
            return
        if length is None:
            self._error(411, "Content-Length required")
            return
        if not self._guard():  # the body is left unread
            return
        if not self._authorized():
            self._error(401, "Authorization: Bearer <codec server token> required")
            return
        if not self.trust():  # evicted or past the header deadline meanwhile
            return
        body = self.rfile.read(length)
        transform: Callable[[Sequence[Payload]], list[Payload]]
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/encode":
            if not self.allow_encode:
                self._error(
                    403,
                    "/encode is disabled on this codec server (start it with `rekey codec-server "
                    "--allow-encode` for a temporal CLI that starts workflows or sends inputs)",
                )
                return
            transform = self.codec.encode_sync
        elif path == "/decode":
            # The UI names the namespace (not the workflow): a format 3 payload of another is refused.
            transform = self.codec.for_namespace(self.headers.get("X-Namespace")).decode_sync
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
    keyring: Keyring,
    token: str,
    *,
    cors_origins: Sequence[str] = DEFAULT_CORS_ORIGINS,
    allow_encode: bool = False,
) -> type[http.server.BaseHTTPRequestHandler]:
    """A request handler class serving the codec protocol for ``keyring`` to bearers of ``token``
    (``/encode`` only with ``allow_encode``)."""
    if len(token) < 32:
        raise CodecError("the codec server token must be at least 32 characters")
    return type(
        "CodecHandler",
        (_CodecHandler,),
        {
            "codec": EncryptionCodec(keyring, allow_unencrypted=True),
            "cors_origins": frozenset(cors_origins),
            "token": token.encode("latin-1"),
            "allow_encode": allow_encode,
        },
    )


class CodecServer(GuardedHTTPServer):
    busy = busy_answer({"error": "too many connections"})
    key_id: str = ""
    """Id of the current codec key (what /encode encrypts under)."""
    home: Path | None = None
    token: str = ""

    def remove_token(self) -> None:
        """Delete this server's token file (if it is still this server's)."""
        if self.home is not None and self.token:
            remove_server_token(self.home, self.token)

    @property
    def port(self) -> int:
        return self.server_port

    @property
    def url(self) -> str:
        return f"http://{BIND_HOST}:{self.port}"

    def stop(self) -> None:
        """Delete the token file (if still ours), stop serving and close the socket (call from
        another thread than serve_forever)."""
        try:
            self.remove_token()
        finally:
            self.shutdown()
            self.server_close()


def serve_codec(
    home: Path,
    port: int = DEFAULT_PORT,
    cors_origins: Sequence[str] | None = None,
    *,
    limits: GuardLimits | None = None,
    allow_encode: bool = False,
) -> CodecServer:
    """Start a codec server for ``<home>``'s keyring on 127.0.0.1:``port`` (0: any free port).

    The port is bound first; only then is a fresh token written to ``<home>/codec/server-token``
    (a server that cannot bind writes none). It serves on a daemon thread; call
    :meth:`CodecServer.stop` to end it and delete the token. ``allow_encode``: serve ``/encode``.
    """
    keyring = load_or_create_codec_keys(home)
    token = new_server_token()
    register_secret(token)
    handler = make_codec_app(
        keyring,
        token,
        cors_origins=DEFAULT_CORS_ORIGINS if cors_origins is None else cors_origins,
        allow_encode=allow_encode,
    )
    server = CodecServer((BIND_HOST, port), handler, limits or GuardLimits(max_body=MAX_BODY_BYTES))
    try:
        write_server_token(home, token)
    except BaseException:
        server.server_close()
        raise
    server.key_id = keyring.current
    server.home = Path(home)
    server.token = token
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="rekey-codec-server", daemon=True
    ).start()
    return server


def run_codec_server(
    home: Path,
    port: int = DEFAULT_PORT,
    cors_origins: Sequence[str] | None = None,
    *,
    allow_encode: bool = False,
) -> int:
    """Serve until SIGTERM or SIGINT; prints the URL to give to ``--ui-codec-endpoint``. Returns 0.
    The token file is deleted on the way out."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server = serve_codec(home, port, cors_origins, allow_encode=allow_encode)
        try:
            print(
                f"codec server on {server.url} (keyring {codec_keys_path(home)}, "
                f"current key {server.key_id}; bearer token in {server_token_path(home)} "
                f"until it stops; /encode {'enabled' if allow_encode else 'disabled'})",
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
