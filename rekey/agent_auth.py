"""The enclave agent's caller credentials, the request and answer signatures, and the client.

Every ``rekey agent serve`` creates fresh tokens when it starts, one per caller, in its state
directory (``<home>/agent/<generation id>`` unless ``--state-dir``): the directory is mode 0700,
each token file 0600, owned by the workload's user; a clean shutdown deletes them. A Unix socket
with a peer-credential check was the alternative; tokens were chosen because every
HTTP client can sign (on every OS), and because distinct named callers
get distinct tokens (nonces are bounded per caller), whereas ``SO_PEERCRED`` only tells users
apart and is Linux-specific.

The agent serves HTTPS only, over attested TLS (`rekey.ratls_transport`): before anything is
sent the client checks that the agent's certificate carries evidence, binding the certificate's
key, of the generation it expects. The tokens still say which caller is calling.

The token itself never travels. Whoever listens on the agent's port (another local process can
bind it once the agent has stopped) must learn nothing it can reuse, and the caller must not
trust an answer the agent did not give. So (scheme ``Rekey-HMAC``):

* a request carries ``X-Rekey-Time`` (Unix seconds), ``X-Rekey-Nonce`` (fresh, 32 random bytes,
  base64url), ``X-Rekey-Body-SHA256`` (hex) and ``Authorization: Rekey-HMAC <mac>``, the
  HMAC-SHA256 under the caller's token of (``rekey-agent-request-v2``, the endpoint the caller
  means as ``HOST:PORT``, method, path, time, nonce, body hash). The agent checks the endpoint
  against its own bound address (the ``Host`` header must name it too), so a relay registered or
  listening in the agent's place cannot forward a caller's signed request: the MAC names the
  relay's port, not the agent's (and the CLI asks ``/v1/identity`` first, with no body, so
  a relay's refused request carries no secret). The agent finds the caller whose token gives
  that MAC (constant-time compares), refuses a time more than ``MAX_SKEW`` seconds off and a
  nonce it has already seen, and checks the body against the hash once read. A captured
  request replays nowhere: its nonce is spent, its time runs out, and an agent that restarts
  has new tokens;
* every answer to an authenticated request carries ``X-Rekey-Proof``: the HMAC-SHA256 under the
  same token of (``rekey-agent-response-v2``, the endpoint, the request's nonce, method, path,
  status, SHA-256 of the body). :class:`AgentClient` refuses any answer without a valid proof
  (:class:`AgentUnproven`), so a port squatter cannot feed it a forged blob or plaintext.

A squatter receives no request at all: it cannot show the agent's evidence in the attested TLS
handshake, so the client sends nothing (before attested TLS it would have received the body: the
plaintext of ``/v1/seal``, a blob for ``/v1/unseal``). Deleting the tokens at shutdown keeps
callers that start after the agent stopped from sending anything.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from attestation.ratls import RatlsIdentity, RatlsVerifier
from rekey.logs import register_secret
from rekey.ratls_transport import RatlsHTTPConnection
from sealing.private_file import PrivateFileError, read_private

DEFAULT_CALLER = "default"
CALLER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
TOKEN_BYTES = 32


class AgentCredentialError(Exception):
    """A token file or the state directory is missing, unsafe or unreadable (no secret in the text)."""


def token_path(state_dir: Path, caller: str = DEFAULT_CALLER) -> Path:
    if not CALLER_NAME.fullmatch(caller):
        raise AgentCredentialError(f"caller name {caller!r} must match {CALLER_NAME.pattern}")
    return state_dir / ("token" if caller == DEFAULT_CALLER else f"token-{caller}")


def _safe_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` 0700, or accept it only if it is ours and not writable by others."""
    state_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        state_dir.mkdir(mode=0o700)
    info = os.lstat(state_dir)
    if not stat.S_ISDIR(info.st_mode):
        raise AgentCredentialError(f"{state_dir}: not a directory (a symlink is refused)")
    if info.st_uid != os.getuid():
        raise AgentCredentialError(f"{state_dir}: owned by another user")
    if info.st_mode & 0o077:
        os.chmod(state_dir, 0o700)


def create_tokens(state_dir: Path, callers: list[str]) -> dict[str, str]:
    """Fresh tokens for ``callers`` (the default caller always included): token -> caller name.

    Each file is written 0600 under a temporary name (never following a symlink) and renamed into
    place, so no reader sees a partial or a world-readable token."""
    _safe_state_dir(state_dir)
    tokens: dict[str, str] = {}
    for caller in dict.fromkeys([DEFAULT_CALLER, *callers]):
        path = token_path(state_dir, caller)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        register_secret(token)  # never in a log line of this process
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, token.encode("ascii") + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        tokens[token] = caller
    return tokens


def read_token(state_dir: Path, caller: str = DEFAULT_CALLER) -> str:
    """The caller's token, read without following a symlink and only from a private file of ours."""
    path = token_path(state_dir, caller)
    try:
        token = read_private(path, limit=1024).decode("ascii", errors="replace").strip()
    except PrivateFileError as exc:
        raise AgentCredentialError(f"cannot read the agent token: {exc}") from None
    if not token:
        raise AgentCredentialError(f"agent token {path} is empty")
    register_secret(token)
    return token


def remove_tokens(state_dir: Path, tokens: Mapping[str, str]) -> None:
    """Delete the token files that still hold these tokens (``token -> caller``), at shutdown.

    A file another agent process has since rewritten for itself is left alone."""
    for token, caller in tokens.items():
        path = token_path(state_dir, caller)
        try:
            current = read_private(path, limit=1024).decode("ascii", errors="replace").strip()
        except PrivateFileError:
            continue
        if hmac.compare_digest(current.encode(), token.encode()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


# ----------------------------------------------------------------------------- signatures

SCHEME = "Rekey-HMAC"
TIME_HEADER = "X-Rekey-Time"
NONCE_HEADER = "X-Rekey-Nonce"
BODY_HEADER = "X-Rekey-Body-SHA256"
PROOF_HEADER = "X-Rekey-Proof"
MAX_SKEW = 60
"""Seconds a request's time may differ from the agent's clock."""
NONCE = re.compile(r"[A-Za-z0-9_-]{22,88}")
BODY_HASH = re.compile(r"[0-9a-f]{64}")


def _mac(token: str, *fields: str) -> str:
    digest = hmac.new(token.encode("ascii"), "\n".join(fields).encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def request_mac(
    token: str, *, endpoint: str, method: str, path: str, timestamp: str, nonce: str, body_sha256: str
) -> str:
    return _mac(token, "rekey-agent-request-v2", endpoint, method, path, timestamp, nonce, body_sha256)


def response_mac(
    token: str, *, endpoint: str, nonce: str, method: str, path: str, status: int, body: bytes
) -> str:
    body_sha256 = hashlib.sha256(body).hexdigest()
    return _mac(token, "rekey-agent-response-v2", endpoint, nonce, method, path, str(status), body_sha256)


def sign_request(
    token: str, method: str, path: str, body: bytes = b"", *, endpoint: str, now: float | None = None
) -> dict[str, str]:
    """The headers that authenticate one request to the agent at ``endpoint`` (``HOST:PORT``, as
    the ``Host`` header names it); its nonce is in ``X-Rekey-Nonce``."""
    timestamp = str(int(time.time() if now is None else now))
    nonce = secrets.token_urlsafe(32)
    body_sha256 = hashlib.sha256(body).hexdigest()
    mac = request_mac(
        token,
        endpoint=endpoint,
        method=method,
        path=path,
        timestamp=timestamp,
        nonce=nonce,
        body_sha256=body_sha256,
    )
    return {
        "Authorization": f"{SCHEME} {mac}",
        TIME_HEADER: timestamp,
        NONCE_HEADER: nonce,
        BODY_HEADER: body_sha256,
    }


class AgentCallError(Exception):
    """The agent answered with an error (its type and message; never a secret)."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.type = str(error.get("type", "Error"))
        self.message = str(error.get("message", ""))
        self.reasons: list[str] = list(error.get("reasons", []))
        super().__init__(f"agent answered {status} {self.type}: {self.message}")


class AgentUnproven(AgentCallError):
    """An answer without a valid ``X-Rekey-Proof``: not from the agent that holds this caller's
    token (a wrong token, or another process on the port). Nothing in it is trusted."""

    def __init__(self, status: int) -> None:
        super().__init__(
            status,
            {
                "type": "Unproven",
                "message": "the answer is not authenticated by the agent (wrong token, or not the agent)",
            },
        )


AGENT_URL_FORM = "https://127.0.0.1:PORT or https://localhost:PORT"


def check_agent_url(url: str) -> tuple[str, int]:
    """(host, port) of an agent URL, which must be https://127.0.0.1:PORT or https://localhost:PORT
    (`AgentCredentialError` otherwise: plain HTTP to an agent is gone)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "https" or parts.hostname not in ("127.0.0.1", "localhost") or not port:
        raise AgentCredentialError(f"the agent URL must be {AGENT_URL_FORM}")
    if parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        raise AgentCredentialError(f"the agent URL must be {AGENT_URL_FORM}")
    return str(parts.hostname), port


class AgentClient:
    """JSON calls to an agent at ``url`` (``https://127.0.0.1:PORT``), signed with ``token``,
    over attested TLS: the agent's certificate must pass ``expect`` (the expectation of the
    generation registered for it, `rekey.ratls_transport.server_expectation`) or nothing is
    sent; ``identity``: a calling agent's own RA-TLS certificate, presented to the agent. Only
    answers the agent proves are trusted (see the module)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        expect: RatlsVerifier,
        identity: RatlsIdentity | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._host, self._port = check_agent_url(url)
        self.url = url.rstrip("/")
        self._token = token
        self._expect = expect
        self._identity = identity
        self.timeout = timeout

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        method = "GET" if body is None else "POST"
        data = b"" if body is None else json.dumps(body).encode()
        endpoint = f"{self._host}:{self._port}"
        headers = sign_request(self._token, method, path, data, endpoint=endpoint)
        nonce = headers[NONCE_HEADER]
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection = RatlsHTTPConnection(
            self._host, self._port, verifier=self._expect, identity=self._identity, timeout=self.timeout
        )
        try:
            connection.request(method, path, body=data if body is not None else None, headers=headers)
            response = connection.getresponse()
            raw = response.read()
            proof = response.getheader(PROOF_HEADER) or ""
            status = response.status
        finally:
            connection.close()
        expected = response_mac(
            self._token, endpoint=endpoint, nonce=nonce, method=method, path=path, status=status, body=raw
        )
        if not hmac.compare_digest(proof.encode("latin-1", errors="replace"), expected.encode()):
            raise AgentUnproven(status)
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AgentCallError(
                status, {"type": "BadAnswer", "message": "the agent's answer is not a JSON object"}
            )
        if status != 200:
            error = answer.get("error")
            raise AgentCallError(status, error if isinstance(error, dict) else {})
        return answer
