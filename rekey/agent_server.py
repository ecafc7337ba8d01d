"""HTTP JSON transport for the enclave agent (``rekey agent serve``), on 127.0.0.1 only.

Binary values travel as base64 strings. Errors answer ``{"error": {"type", "message"[, "reasons"]}}``
with 400 (bad request), 401 (no or wrong bearer token), 403 (policy, nonce or Origin refused),
404, 411 (no Content-Length), 413, 415 (not ``application/json``), 421 (foreign Host), 422
(evidence or blob unusable) or 503 (too many connections).

Every request must present one of the agent's bearer tokens (``rekey.agent_auth``), name the
agent itself in ``Host`` (``127.0.0.1:PORT`` or ``localhost:PORT``: a DNS-rebinding page names its
own host) and carry no ``Origin`` unless that origin is allowed (none by default); every POST must
be ``application/json`` with a plain decimal ``Content-Length`` within the limit, so a browser's
simple ``text/plain`` POST is refused and nothing is read past the limit. Each connection has an
idle timeout and a whole-request deadline, and at most ``max_connections`` are served at once;
the excess gets 503 at once.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from attestation.errors import AttestationError, NonceMismatch, PolicyDenied
from sealing.agent import EnclaveAgent
from sealing.errors import SealingError

MAX_BODY = 64 * 1024 * 1024
DRAIN_LIMIT = 1024 * 1024  # a refused request's body is read and dropped only up to this size
log = logging.getLogger("rekey.agent")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_BUSY_BODY = json.dumps({"error": {"type": "Busy", "message": "too many connections"}}).encode()
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n\r\n".encode()
    + _BUSY_BODY
)


@dataclass(frozen=True)
class ServerLimits:
    max_body: int = MAX_BODY
    max_connections: int = 32
    idle_timeout: float = 10.0
    """Seconds a connection may stay silent (each read)."""
    request_timeout: float = 60.0
    """Seconds a whole request may take, however slowly it trickles in (slowloris)."""


class Refused(Exception):
    """A request refused before it reaches the agent: the status, an error type, a message."""

    def __init__(self, status: HTTPStatus, type_: str, message: str, *, drain: bool = True) -> None:
        super().__init__(message)
        self.status, self.type, self.drain = status, type_, drain


class BadRequest(Exception):
    pass


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise BadRequest(f"missing field '{name}'")
    return body[name]


def _bytes(body: dict[str, Any], name: str) -> bytes:
    value = _field(body, name)
    if not isinstance(value, str):
        raise BadRequest(f"field '{name}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequest(f"field '{name}' is not valid base64") from None


def _text(body: dict[str, Any], name: str, default: str | None = None) -> str:
    value = body.get(name, default)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field '{name}' must be a non-empty string")
    return value


class AgentApi:
    """Maps JSON requests to ``EnclaveAgent`` calls."""

    def __init__(self, agent: EnclaveAgent) -> None:
        self.agent = agent
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any], str], dict[str, Any]]] = {
            ("GET", "/v1/identity"): lambda _b, _c: self.agent.identity(),
            ("POST", "/v1/nonce"): lambda _b, caller: {"nonce": _b64(self.agent.new_nonce(caller))},
            ("POST", "/v1/import-nonce"): lambda _b, caller: {
                "nonce": _b64(self.agent.new_import_nonce(caller))
            },
            ("POST", "/v1/attest"): self.attest,
            ("POST", "/v1/seal"): self.seal,
            ("POST", "/v1/unseal"): self.unseal,
            ("POST", "/v1/export"): self.export,
            ("POST", "/v1/import"): self.import_,
        }

    def attest(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        result = self.agent.attest(_bytes(body, "nonce"))
        return {"evidence": _b64(result.evidence), "public_key": _b64(result.public_key), "platform": "sim"}

    def seal(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        policy = _text(body, "policy", "mrenclave")
        if policy not in ("mrenclave", "mrsigner"):
            raise BadRequest("field 'policy' must be mrenclave or mrsigner")
        blob = self.agent.seal(
            namespace=_text(body, "namespace", "default"),
            name=_text(body, "name"),
            data=_bytes(body, "data"),
            policy=policy,  # type: ignore[arg-type]
        )
        return {"blob": _b64(blob)}

    def unseal(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        # Only an authenticated caller gets here (the handler checks the bearer token first).
        return {"data": _b64(self.agent.unseal(_bytes(body, "blob")))}

    def export(self, body: dict[str, Any], caller: str) -> dict[str, Any]:
        blobs = _field(body, "blobs")
        if not isinstance(blobs, list):
            raise BadRequest("field 'blobs' must be a list of base64 strings")
        return self.agent.export(
            peer_evidence=_bytes(body, "peer_evidence"),
            peer_public_key=_bytes(body, "peer_public_key"),
            nonce=_bytes(body, "nonce"),
            import_nonce=_bytes(body, "import_nonce"),
            blobs=[_bytes({"blob": b}, "blob") for b in blobs],
            caller=caller,
        )

    def import_(self, body: dict[str, Any], caller: str) -> dict[str, Any]:
        resealed = self.agent.import_package(_field(body, "package"), caller)
        return {"blobs": [{"namespace": ns, "name": name, "blob": _b64(blob)} for ns, name, blob in resealed]}


def _error(exc: BaseException) -> tuple[HTTPStatus, dict[str, Any]]:
    body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PolicyDenied):
        body["reasons"] = exc.reasons
        return HTTPStatus.FORBIDDEN, body
    if isinstance(exc, NonceMismatch | PermissionError):
        return HTTPStatus.FORBIDDEN, body
    if isinstance(exc, BadRequest | ValueError):  # domain code raises ValueError for bad arguments
        return HTTPStatus.BAD_REQUEST, body
    if isinstance(exc, AttestationError | SealingError):
        return HTTPStatus.UNPROCESSABLE_ENTITY, body
    log.exception("agent request failed")
    return HTTPStatus.INTERNAL_SERVER_ERROR, {"type": "InternalError", "message": "internal error"}


def make_handler(
    api: AgentApi, tokens: Mapping[str, str], allowed_origins: Iterable[str], limits: ServerLimits
) -> type[BaseHTTPRequestHandler]:
    """The request handler; ``tokens`` maps each bearer token to its caller's name."""
    credentials = [(token.encode("ascii"), caller) for token, caller in tokens.items()]
    if not credentials:
        raise ValueError("the agent needs at least one caller token")
    origins = frozenset(allowed_origins)

    class Handler(BaseHTTPRequestHandler):
        server_version = "rekey-agent/1"
        timeout = limits.idle_timeout

        def log_message(self, format: str, *args: Any) -> None:  # request line only; bodies never logged
            log.info("%s %s", self.address_string(), format % args)

        def _reply(
            self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _one(self, name: str) -> str | None:
            values = self.headers.get_all(name) or []
            if len(values) > 1:
                raise Refused(
                    HTTPStatus.BAD_REQUEST, "BadRequest", f"more than one {name} header", drain=False
                )
            return values[0] if values else None

        def _length(self) -> int | None:
            """The declared body length, checked before anything is read; None when absent."""
            if self._one("Transfer-Encoding") is not None:
                raise Refused(
                    HTTPStatus.BAD_REQUEST, "BadRequest", "Transfer-Encoding is not accepted", drain=False
                )
            text = self._one("Content-Length")
            if text is None:
                return None
            if not _DECIMAL.fullmatch(text.strip()):
                raise Refused(
                    HTTPStatus.BAD_REQUEST,
                    "BadRequest",
                    "Content-Length must be a decimal number",
                    drain=False,
                )
            length = int(text)
            if length > limits.max_body:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "TooLarge", "body too large", drain=False)
            return length

        def _check_host_and_origin(self) -> None:
            port = self.connection.getsockname()[1]
            host = (self._one("Host") or "").strip().lower()
            if host not in (f"127.0.0.1:{port}", f"localhost:{port}"):
                raise Refused(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    "MisdirectedRequest",
                    "Host must be this agent's own address",
                )
            origin = self._one("Origin")
            if origin is not None and origin not in origins:
                raise Refused(
                    HTTPStatus.FORBIDDEN, "OriginRefused", "requests from this Origin are not allowed"
                )

        def _caller(self) -> str:
            value = self._one("Authorization") or ""
            scheme, _, presented = value.partition(" ")
            candidate = presented.strip().encode("latin-1", errors="replace")
            caller = None
            for token, name in credentials:  # every token compared, in constant time
                if hmac.compare_digest(candidate, token) and scheme.lower() == "bearer":
                    caller = name
            if caller is None:
                raise Refused(
                    HTTPStatus.UNAUTHORIZED, "Unauthorized", "a valid agent bearer token is required"
                )
            return caller

        def _body(self, method: str, length: int | None) -> dict[str, Any]:
            if method == "GET":
                if length:
                    raise Refused(HTTPStatus.BAD_REQUEST, "BadRequest", "GET takes no body")
                return {}
            content_type = (self._one("Content-Type") or "").split(";", 1)[0].strip().lower()
            if content_type != "application/json":
                raise Refused(
                    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    "Content-Type must be application/json",
                )
            if length is None:
                raise Refused(
                    HTTPStatus.LENGTH_REQUIRED, "LengthRequired", "Content-Length is required", drain=False
                )
            try:
                raw = self.rfile.read(length)
            except OSError:  # idle timeout or the deadline dropped the connection
                raise Refused(
                    HTTPStatus.REQUEST_TIMEOUT, "Timeout", "body not received in time", drain=False
                ) from None
            if len(raw) != length:
                raise Refused(
                    HTTPStatus.BAD_REQUEST, "BadRequest", "body shorter than Content-Length", drain=False
                )
            try:
                body = json.loads(raw)
            except ValueError:
                raise BadRequest("body is not JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("body must be a JSON object")
            return body

        def _drain(self, length: int | None) -> None:
            """Read and drop a small refused body, so the client reads the answer, not a reset."""
            if length and length <= DRAIN_LIMIT:
                with contextlib.suppress(OSError):
                    self.rfile.read(length)

        def _handle(self, method: str) -> None:
            self.close_connection = True
            length: int | None = None
            try:
                length = self._length()
                self._check_host_and_origin()
                caller = self._caller()
                route = api.routes.get((method, self.path))
                if route is None:
                    raise Refused(HTTPStatus.NOT_FOUND, "NotFound", self.path)
                body = self._body(method, length)
                length = None  # read
            except Refused as refused:
                if refused.drain:
                    self._drain(length)
                headers = (
                    {"WWW-Authenticate": 'Bearer realm="rekey-agent"'} if refused.status == 401 else None
                )
                self._reply(
                    refused.status, {"error": {"type": refused.type, "message": str(refused)}}, headers
                )
                return
            except Exception as exc:
                status, error = _error(exc)
                self._reply(status, {"error": error})
                return
            try:
                self._reply(HTTPStatus.OK, route(body, caller))
            except Exception as exc:
                status, error = _error(exc)
                self._reply(status, {"error": error})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


def _drop(connection: socket.socket) -> None:
    """End a connection past its deadline: the handler's blocked read returns at once."""
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class AgentHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``limits.max_connections`` at once, each with a deadline."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], limits: ServerLimits
    ) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:  # best effort, never blocking the accept loop
                request.setblocking(False)
                with contextlib.suppress(OSError):
                    request.recv(65536)  # what already arrived, so closing sends no reset
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away or was dropped at its deadline; no traceback on stderr.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        deadline = threading.Timer(self.limits.request_timeout, _drop, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def make_server(
    agent: EnclaveAgent,
    port: int = 0,
    *,
    tokens: Mapping[str, str],
    allowed_origins: Iterable[str] = (),
    limits: ServerLimits | None = None,
) -> AgentHTTPServer:
    """Bind 127.0.0.1:port (0 picks a free port); the caller runs ``serve_forever``.

    ``tokens`` maps each accepted bearer token to its caller's name (``rekey.agent_auth``)."""
    limits = limits or ServerLimits()
    handler = make_handler(AgentApi(agent), tokens, allowed_origins, limits)
    return AgentHTTPServer(("127.0.0.1", port), handler, limits)
