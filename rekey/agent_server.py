"""HTTPS JSON transport for the enclave agent (``rekey agent serve``), on 127.0.0.1 only.

HTTPS only, over attested TLS (`rekey.ratls_transport`): the agent's certificate carries its
enclave's evidence over the certificate key, and a calling agent's optional client certificate
must pass the agent's peer policy; the signed requests below work inside that connection.

Binary values travel as base64 strings. Errors answer ``{"error": {"type", "message"[, "reasons"]}}``
with 400 (bad request), 401 (no or wrong bearer token), 403 (policy, nonce or Origin refused),
404, 411 (no Content-Length), 413, 415 (not ``application/json``), 421 (foreign Host), 422
(evidence or blob unusable), 429 (too many requests in the replay window) or 503 (too many
connections).

Every request must be signed with one of the agent's caller tokens (``rekey.agent_auth``: an
HMAC over this agent's own address as the caller means it, a fresh nonce, the time, method, path
and body; never the token itself), and every answer to a signed request carries the agent's
proof over it (the address included); the request must name the
agent itself in ``Host`` (``127.0.0.1:PORT`` or ``localhost:PORT``: a DNS-rebinding page names its
own host) and carry no ``Origin`` unless that origin is allowed (none by default); every POST must
be ``application/json`` with a plain decimal ``Content-Length`` within the limit, so a browser's
simple ``text/plain`` POST is refused and nothing is read past the limit. Connections are
guarded by ``rekey.http_guard``: idle timeout, whole-request deadline, a short deadline for the
headers until the request is authenticated, capped headers, at most ``max_connections`` at once;
an unauthenticated connection is the first to give its slot to a newcomer, so anonymous clients
cannot hold the agent's slots, and a request without a valid signature is answered and closed at
once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from functools import partial
from http import HTTPStatus
from typing import Any

from attestation.errors import AttestationError, NonceMismatch, PolicyDenied
from attestation.ratls import CERT_LIFETIME, RatlsIdentity, RatlsVerifier
from kms_adapters.errors import PolicyDenied as ReleaseDenied
from rekey.agent_auth import (
    BODY_HASH,
    BODY_HEADER,
    MAX_SKEW,
    NONCE,
    NONCE_HEADER,
    PROOF_HEADER,
    SCHEME,
    TIME_HEADER,
    request_mac,
    response_mac,
)
from rekey.http_guard import (
    MAX_BODY,
    GuardedHandler,
    GuardLimits,
    Refused,
    declared_length,
    one_header,
)
from rekey.ratls_transport import RatlsHTTPServer
from sealing.agent import MAX_SEAL_VERSION, EnclaveAgent
from sealing.errors import SealingError

DRAIN_LIMIT = 1024 * 1024  # a refused request's body is read and dropped only up to this size
MAX_SEEN_NONCES = 200_000  # requests one caller may make within the replay window (2 * MAX_SKEW s)
log = logging.getLogger("rekey.agent")
ServerLimits = GuardLimits
__all__ = ["MAX_BODY", "AgentApi", "AgentHTTPServer", "ServerLimits", "make_handler", "make_server"]


class _SeenNonces:
    """Request nonces accepted in the last ``2 * MAX_SKEW`` seconds, per caller: a replay is
    refused, and a caller that fills its own window (429) never fills another caller's."""

    def __init__(self) -> None:
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._per_caller: dict[str, int] = {}
        self._lock = threading.Lock()

    def spend(self, caller: str, nonce: str, now: float) -> None:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) <= now:
                (who, _), _ = self._seen.popitem(last=False)
                left = self._per_caller[who] - 1
                if left:
                    self._per_caller[who] = left
                else:
                    del self._per_caller[who]
            if (caller, nonce) in self._seen:
                raise Refused(HTTPStatus.UNAUTHORIZED, "Unauthorized", "this request was already received")
            if self._per_caller.get(caller, 0) >= MAX_SEEN_NONCES:
                raise Refused(
                    HTTPStatus.TOO_MANY_REQUESTS, "TooManyRequests", "too many requests; try again later"
                )
            self._seen[(caller, nonce)] = now + 2 * MAX_SKEW
            self._per_caller[caller] = self._per_caller.get(caller, 0) + 1


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
            ("POST", "/v1/check"): self.check,
            ("POST", "/v1/open"): self.open,
            ("POST", "/v1/rebind"): self.rebind,
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
        blob_id = body.get("blob_id")
        if blob_id is not None:
            if not isinstance(blob_id, str):
                raise BadRequest("field 'blob_id' must be a UUID string")
            try:
                parsed_id = uuid.UUID(blob_id)
            except ValueError:
                raise BadRequest("field 'blob_id' must be a UUID string") from None
            if str(parsed_id) != blob_id:
                raise BadRequest("field 'blob_id' must be a UUID string in canonical form")
        version = body.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_SEAL_VERSION:
            raise BadRequest(f"field 'version' must be an integer in 1..{MAX_SEAL_VERSION}")
        blob = self.agent.seal(
            namespace=_text(body, "namespace", "default"),
            name=_text(body, "name"),
            data=_bytes(body, "data"),
            policy=policy,  # type: ignore[arg-type]
            blob_id=None if blob_id is None else parsed_id,
            version=version,
        )
        return {"blob": _b64(blob)}

    def unseal(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        # Only an authenticated caller gets here (the handler checks the bearer token first).
        return {"data": _b64(self.agent.unseal(_bytes(body, "blob")))}

    def check(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        token = body.get("token")
        if token is not None and not isinstance(token, str):
            raise BadRequest("field 'token' must be a string")
        return self.agent.check(_bytes(body, "blob"), token)

    def open(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        # A KMS-wrapped blob, opened through the release gate; only an authenticated caller
        # gets here, as for /v1/unseal.
        return {"data": _b64(self.agent.open_kms(_bytes(body, "blob"), _text(body, "token")))}

    def rebind(self, body: dict[str, Any], _caller: str) -> dict[str, Any]:
        blobs = _field(body, "blobs")
        if not isinstance(blobs, list):
            raise BadRequest("field 'blobs' must be a list of base64 strings")
        rebound = self.agent.rebind(
            [_bytes({"blob": b}, "blob") for b in blobs],
            from_generation=_text(body, "from_generation"),
            token=_text(body, "token"),
        )
        return {"blobs": [_b64(blob) for blob in rebound]}

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


def error_answer(exc: BaseException) -> tuple[HTTPStatus, dict[str, Any]]:
    body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, PolicyDenied | ReleaseDenied):
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
) -> type[GuardedHandler]:
    """The request handler; ``tokens`` maps each caller token to its caller's name."""
    credentials = [(token, caller) for token, caller in tokens.items()]
    if not credentials:
        raise ValueError("the agent needs at least one caller token")
    origins = frozenset(allowed_origins)
    seen = _SeenNonces()

    class Handler(GuardedHandler):
        server_version = "rekey-agent/1"
        signer: tuple[str, str] | None = None
        """(token, request nonce) of an authenticated request: its answers carry the proof."""
        endpoint = ""
        """This agent's own address as the request's ``Host`` named it (``HOST:PORT``)."""

        def log_message(self, format: str, *args: Any) -> None:  # request line only; bodies never logged
            extra = {"generation": api.agent.manifest.id, "client": self.address_string()}
            if format == '"%s" %s %s' and len(args) == 3:  # a request's line, status and size
                extra["request"], extra["status"] = str(args[0]), str(args[1])
            log.info("%s %s", self.address_string(), format % args, extra=extra)

        def _reply(
            self, status: HTTPStatus, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if self.signer is not None:
                token, nonce = self.signer
                proof = response_mac(
                    token,
                    endpoint=self.endpoint,
                    nonce=nonce,
                    method=self.command,
                    path=self.path,
                    status=int(status),
                    body=data,
                )
                self.send_header(PROOF_HEADER, proof)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _one(self, name: str) -> str | None:
            return one_header(self.headers, name)

        def _check_host_and_origin(self) -> None:
            port = self.connection.getsockname()[1]
            host = (self._one("Host") or "").strip().lower()
            if host not in (f"127.0.0.1:{port}", f"localhost:{port}"):
                raise Refused(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    "MisdirectedRequest",
                    "Host must be this agent's own address",
                )
            self.endpoint = host
            origin = self._one("Origin")
            if origin is not None and origin not in origins:
                raise Refused(
                    HTTPStatus.FORBIDDEN, "OriginRefused", "requests from this Origin are not allowed"
                )

        def _caller(self, method: str) -> tuple[str, str]:
            """The authenticated caller's (name, declared body hash); refuses an unsigned,
            wrongly signed, stale or replayed request."""
            unauthorized = Refused(
                HTTPStatus.UNAUTHORIZED,
                "Unauthorized",
                "a request signed with an agent caller token is required",
            )
            scheme, _, presented = (self._one("Authorization") or "").strip().partition(" ")
            timestamp = (self._one(TIME_HEADER) or "").strip()
            nonce = (self._one(NONCE_HEADER) or "").strip()
            body_sha256 = (self._one(BODY_HEADER) or "").strip()
            if scheme.lower() != SCHEME.lower() or not timestamp.isascii() or not timestamp.isdigit():
                raise unauthorized
            if not NONCE.fullmatch(nonce) or not BODY_HASH.fullmatch(body_sha256):
                raise unauthorized
            candidate = presented.strip().encode("latin-1", errors="replace")
            found = None
            for token, name in credentials:  # every token tried, each compared in constant time
                expected = request_mac(
                    token,
                    endpoint=self.endpoint,
                    method=method,
                    path=self.path,
                    timestamp=timestamp,
                    nonce=nonce,
                    body_sha256=body_sha256,
                )
                if hmac.compare_digest(candidate, expected.encode("ascii")):
                    found = (token, name)
            if found is None:
                raise unauthorized
            now = time.time()
            if abs(now - int(timestamp[:20])) > MAX_SKEW:
                raise Refused(
                    HTTPStatus.UNAUTHORIZED, "Unauthorized", f"request time is more than {MAX_SKEW}s off"
                )
            seen.spend(found[1], nonce, now)
            self.signer = (found[0], nonce)
            return found[1], body_sha256

        def _body(self, method: str, length: int | None, body_sha256: str) -> dict[str, Any]:
            if method == "GET":
                if length:
                    raise Refused(HTTPStatus.BAD_REQUEST, "BadRequest", "GET takes no body")
                if body_sha256 != hashlib.sha256(b"").hexdigest():
                    raise Refused(HTTPStatus.UNAUTHORIZED, "Unauthorized", "the body is not the one signed")
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
            if not hmac.compare_digest(hashlib.sha256(raw).hexdigest(), body_sha256):
                raise Refused(HTTPStatus.UNAUTHORIZED, "Unauthorized", "the body is not the one signed")
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
                length = declared_length(self.headers, limits.max_body)
                self._check_host_and_origin()
                caller, body_sha256 = self._caller(method)
                if not self.trust():  # evicted or past the header deadline meanwhile
                    return
                route = api.routes.get((method, self.path))
                if route is None:
                    raise Refused(HTTPStatus.NOT_FOUND, "NotFound", self.path)
                body = self._body(method, length, body_sha256)
                length = None  # read
            except Refused as refused:
                if refused.drain:
                    self._drain(length)
                headers = (
                    {"WWW-Authenticate": f'{SCHEME} realm="rekey-agent"'} if refused.status == 401 else None
                )
                self._reply(
                    refused.status, {"error": {"type": refused.type, "message": str(refused)}}, headers
                )
                return
            except Exception as exc:
                status, error = error_answer(exc)
                self._reply(status, {"error": error})
                return
            try:
                self._reply(HTTPStatus.OK, route(body, caller))
            except Exception as exc:
                status, error = error_answer(exc)
                self._reply(status, {"error": error})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


class AgentHTTPServer(RatlsHTTPServer):
    """The agent's server: attested TLS (`rekey.ratls_transport`) with ``rekey.http_guard`` limits."""

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"


def make_server(
    agent: EnclaveAgent,
    port: int = 0,
    *,
    tokens: Mapping[str, str],
    allowed_origins: Iterable[str] = (),
    limits: ServerLimits | None = None,
    identity: RatlsIdentity | None = None,
    peer_verifier: RatlsVerifier | None = None,
    cert_lifetime: timedelta = CERT_LIFETIME,
    renew_every: float | None = None,
) -> AgentHTTPServer:
    """Bind 127.0.0.1:port (0 picks a free port) for HTTPS only; the caller runs ``serve_forever``.

    ``tokens`` maps each accepted caller token to its caller's name (``rekey.agent_auth``).
    ``identity``: a fixed RA-TLS certificate and key; by default a fresh one from the agent's
    enclave (`EnclaveAgent.ratls_identity`, valid ``cert_lifetime``), renewed the same way every
    ``renew_every`` seconds (default: half the lifetime, `rekey.ratls_transport.RENEW_EVERY` for
    the default lifetime), so a new handshake never meets an ended certificate; ``peer_verifier``:
    the check of a calling agent's optional client certificate (None: none is asked for)."""
    every = cert_lifetime.total_seconds() / 2 if renew_every is None else renew_every
    if identity is None and not 0 < every < cert_lifetime.total_seconds():
        raise ValueError("renew_every must be positive and shorter than the certificate's lifetime")
    limits = limits or ServerLimits()
    handler = make_handler(AgentApi(agent), tokens, allowed_origins, limits)
    return AgentHTTPServer(
        ("127.0.0.1", port),
        handler,
        limits,
        identity=identity or agent.ratls_identity(cert_lifetime),
        peer_verifier=peer_verifier,
        renew=partial(agent.ratls_identity, cert_lifetime) if identity is None else None,
        renew_every=every,
    )
