"""HTTP JSON transport for the enclave agent (``rekey agent serve``), on 127.0.0.1 only.

Binary values travel as base64 strings. Errors answer ``{"error": {"type", "message"[, "reasons"]}}``
with 400 (bad request), 403 (policy or nonce refused), 404, 413 or 422 (evidence or blob
unusable). ``/v1/unseal`` answers only a loopback caller: the plaintext stays inside the
TEE boundary.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from attestation.errors import AttestationError, NonceMismatch, PolicyDenied
from sealing.agent import EnclaveAgent
from sealing.errors import SealingError

MAX_BODY = 64 * 1024 * 1024
log = logging.getLogger("rekey.agent")


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
        self.routes: dict[tuple[str, str], Callable[[dict[str, Any], bool], dict[str, Any]]] = {
            ("GET", "/v1/identity"): lambda _b, _l: self.agent.identity(),
            ("POST", "/v1/nonce"): lambda _b, _l: {"nonce": _b64(self.agent.new_nonce())},
            ("POST", "/v1/import-nonce"): lambda _b, _l: {"nonce": _b64(self.agent.new_import_nonce())},
            ("POST", "/v1/attest"): self.attest,
            ("POST", "/v1/seal"): self.seal,
            ("POST", "/v1/unseal"): self.unseal,
            ("POST", "/v1/export"): self.export,
            ("POST", "/v1/import"): self.import_,
        }

    def attest(self, body: dict[str, Any], _local: bool) -> dict[str, Any]:
        result = self.agent.attest(_bytes(body, "nonce"))
        return {"evidence": _b64(result.evidence), "public_key": _b64(result.public_key), "platform": "sim"}

    def seal(self, body: dict[str, Any], _local: bool) -> dict[str, Any]:
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

    def unseal(self, body: dict[str, Any], local: bool) -> dict[str, Any]:
        if not local:
            raise PermissionError("unseal answers only a caller on this host")
        return {"data": _b64(self.agent.unseal(_bytes(body, "blob")))}

    def export(self, body: dict[str, Any], _local: bool) -> dict[str, Any]:
        blobs = _field(body, "blobs")
        if not isinstance(blobs, list):
            raise BadRequest("field 'blobs' must be a list of base64 strings")
        return self.agent.export(
            peer_evidence=_bytes(body, "peer_evidence"),
            peer_public_key=_bytes(body, "peer_public_key"),
            nonce=_bytes(body, "nonce"),
            import_nonce=_bytes(body, "import_nonce"),
            blobs=[_bytes({"blob": b}, "blob") for b in blobs],
        )

    def import_(self, body: dict[str, Any], _local: bool) -> dict[str, Any]:
        resealed = self.agent.import_package(_field(body, "package"))
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


def make_handler(api: AgentApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "rekey-agent/1"

        def log_message(self, format: str, *args: Any) -> None:  # request line only; bodies never logged
            log.info("%s %s", self.address_string(), format % args)

        def _reply(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _handle(self, method: str) -> None:
            route = api.routes.get((method, self.path))
            if route is None:
                self._reply(HTTPStatus.NOT_FOUND, {"error": {"type": "NotFound", "message": self.path}})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    self._reply(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        {"error": {"type": "TooLarge", "message": "body too large"}},
                    )
                    return
                raw = self.rfile.read(length) if length else b"{}"
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise BadRequest("body is not JSON") from None
                if not isinstance(body, dict):
                    raise BadRequest("body must be a JSON object")
                local = ipaddress.ip_address(self.client_address[0]).is_loopback
                self._reply(HTTPStatus.OK, route(body, local))
            except Exception as exc:
                status, error = _error(exc)
                self._reply(status, {"error": error})

        def do_GET(self) -> None:
            self._handle("GET")

        def do_POST(self) -> None:
            self._handle("POST")

    return Handler


def make_server(agent: EnclaveAgent, port: int = 0) -> ThreadingHTTPServer:
    """Bind 127.0.0.1:port (0 picks a free port); the caller runs ``serve_forever``."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(AgentApi(agent)))
    server.daemon_threads = True
    return server
