"""The enclave agent's caller credentials, and the client that presents them.

Every ``rekey agent serve`` creates fresh bearer tokens when it starts, one per caller, in its
state directory (``<home>/agent/<generation id>`` unless ``--state-dir``): the directory is mode
0700, each token file 0600, owned by the workload's user. A caller proves it may use the agent by
reading its token file and sending ``Authorization: Bearer <token>``; the agent compares in
constant time. A Unix socket with a peer-credential check was the alternative; tokens were chosen
because the agent stays plain HTTP on 127.0.0.1 (every HTTP client works, on every OS), and
because distinct named callers get distinct tokens (nonces are bounded per caller), whereas
``SO_PEERCRED`` only tells users apart and is Linux-specific.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

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
    path = token_path(state_dir, caller)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise AgentCredentialError(f"cannot read the agent token {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        token = handle.read(1024).decode("ascii", errors="replace").strip()
    if not token:
        raise AgentCredentialError(f"agent token {path} is empty")
    return token


class AgentCallError(Exception):
    """The agent answered with an error (its type and message; never a secret)."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        self.status = status
        self.type = str(error.get("type", "Error"))
        self.message = str(error.get("message", ""))
        self.reasons: list[str] = list(error.get("reasons", []))
        super().__init__(f"agent answered {status} {self.type}: {self.message}")


class AgentClient:
    """JSON calls to an agent at ``url`` (``http://127.0.0.1:PORT``), presenting ``token``."""

    def __init__(self, url: str, token: str, *, timeout: float = 30.0) -> None:
        if not url.startswith(("http://127.0.0.1:", "http://localhost:")):
            raise AgentCredentialError("the agent URL must be http://127.0.0.1:PORT or http://localhost:PORT")
        self.url = url.rstrip("/")
        self._token = token
        self.timeout = timeout

    def call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self._token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(  # noqa: S310 (the URL is checked to be http on loopback)
            self.url + path, data=data, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (URL checked: loopback http)  # nosec B310
                result: dict[str, Any] = json.loads(response.read())
                return result
        except urllib.error.HTTPError as exc:
            try:
                error = json.loads(exc.read()).get("error", {})
            except ValueError:
                error = {"type": "HTTPError", "message": exc.reason}
            raise AgentCallError(exc.code, error) from None
