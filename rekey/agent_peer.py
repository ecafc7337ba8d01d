"""An enclave agent as a generation migration uses it (`sealing.migration.AgentPort`): nonces,
attestation, export and import over `rekey.agent_auth.AgentClient` (signed requests, proven
answers), over attested TLS: the agent's certificate must carry evidence of its registered
generation (`registered_expectations`). Failures are one line: `sealing.migration.AgentDown`
when the agent cannot be reached or does not prove its answer (or fails),
`sealing.migration.AgentRefused` when it refuses, `sealing.migration.AgentUntrusted` (a refusal)
when its certificate does not show the attested agent expected."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attestation.ratls import RatlsVerifier
from rekey.agent_auth import AgentCallError, AgentClient, AgentCredentialError, AgentUnproven, read_token
from rekey.ratls_transport import RatlsUntrusted, server_expectation
from sealing.errors import SealingError
from sealing.migration import AgentDown, AgentRefused, AgentUntrusted, manifest_of
from sealing.store import AgentRecord, SealedStateStore

__all__ = ["AgentPeer", "peers_from_state_dirs", "registered_expectations"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class AgentPeer:
    def __init__(self, client: AgentClient) -> None:
        self._client = client

    def _call(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            return self._client.call(path, body)
        except AgentUnproven as exc:
            raise AgentDown(f"the agent at {self._client.url}: {exc.message}") from None
        except AgentCallError as exc:
            if exc.status >= 500:
                raise AgentDown(f"the agent at {self._client.url} failed: {exc}") from None
            reasons = f" ({'; '.join(exc.reasons)})" if exc.reasons else ""
            raise AgentRefused(f"the agent at {self._client.url} refused: {exc}{reasons}") from None
        except RatlsUntrusted as exc:  # before OSError: another build or an impostor, not an outage
            raise AgentUntrusted(
                f"the agent at {self._client.url} is not the attested agent expected: {exc.strerror}"
            ) from None
        except OSError as exc:
            raise AgentDown(
                f"cannot reach the agent at {self._client.url}: {exc.strerror or type(exc).__name__}"
            ) from None

    def _bytes(self, answer: dict[str, Any], field: str) -> bytes:
        value = answer.get(field)
        try:
            if not isinstance(value, str):
                raise ValueError
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise AgentDown(f"the agent at {self._client.url} answered without a base64 {field!r}") from None

    def identity(self) -> dict[str, Any]:
        return self._call("/v1/identity", None)

    def nonce(self) -> bytes:
        return self._bytes(self._call("/v1/nonce", {}), "nonce")

    def import_nonce(self) -> bytes:
        return self._bytes(self._call("/v1/import-nonce", {}), "nonce")

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        answer = self._call("/v1/attest", {"nonce": _b64(nonce)})
        return self._bytes(answer, "evidence"), self._bytes(answer, "public_key")

    def export(
        self,
        *,
        peer_evidence: bytes,
        peer_public_key: bytes,
        nonce: bytes,
        import_nonce: bytes,
        blobs: list[bytes],
    ) -> dict[str, Any]:
        return self._call(
            "/v1/export",
            {
                "peer_evidence": _b64(peer_evidence),
                "peer_public_key": _b64(peer_public_key),
                "nonce": _b64(nonce),
                "import_nonce": _b64(import_nonce),
                "blobs": [_b64(b) for b in blobs],
            },
        )

    def import_package(self, package: dict[str, Any]) -> list[tuple[str, str, bytes]]:
        answer = self._call("/v1/import", {"package": package})
        items = answer.get("blobs")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise AgentDown(f"the agent at {self._client.url} answered without a blob list")
        return [(str(i.get("namespace")), str(i.get("name")), self._bytes(i, "blob")) for i in items]

    def unseal(self, blob: bytes) -> bytes:
        return self._bytes(self._call("/v1/unseal", {"blob": _b64(blob)}), "data")

    def check(self, blob: bytes) -> bool:
        answer = self._call("/v1/check", {"blob": _b64(blob)})
        if answer.get("opens") is not True:
            raise AgentDown(f"the agent at {self._client.url} answered /v1/check without opens")
        return True

    def check_kms(self, blob: bytes, token: str) -> bool:
        """Whether the agent opens a KMS-wrapped blob through the release gate (no plaintext)."""
        answer = self._call("/v1/check", {"blob": _b64(blob), "token": token})
        if answer.get("opens") is not True:
            raise AgentDown(f"the agent at {self._client.url} answered /v1/check without opens")
        return True

    def rebind(self, blobs: list[bytes], *, from_generation: str, token: str) -> list[bytes]:
        answer = self._call(
            "/v1/rebind",
            {"blobs": [_b64(b) for b in blobs], "from_generation": from_generation, "token": token},
        )
        items = answer.get("blobs")
        if not isinstance(items, list):
            raise AgentDown(f"the agent at {self._client.url} answered without a blob list")
        return [self._bytes({"blob": item}, "blob") for item in items]


def registered_expectations(
    store: SealedStateStore, roots_for: Callable[[str], list[bytes]]
) -> Callable[[AgentRecord], RatlsVerifier]:
    """What a registered agent's RA-TLS certificate must show: the evidence of its registered
    generation (the manifest in ``store``) on its host, whose sim root CAs ``roots_for(host_id)``
    answers. A generation that is not registered, or an unknown host: `AgentDown`."""

    def expect(record: AgentRecord) -> RatlsVerifier:
        try:
            manifest = manifest_of(store, record.generation)
            return server_expectation(manifest, roots_for(record.host_id))
        except (SealingError, ValueError) as exc:
            raise AgentDown(f"agent {record.agent_id}: its certificate cannot be checked: {exc}") from None

    return expect


def peers_from_state_dirs(
    state_dir_for: Callable[[AgentRecord], Path],
    expect_for: Callable[[AgentRecord], RatlsVerifier],
    caller: str = "default",
    timeout: float = 60.0,
) -> Callable[[AgentRecord], AgentPeer]:
    """Agents reached at their registered endpoint over attested TLS (the certificate must pass
    ``expect_for(record)``), with ``caller``'s token read from the directory
    ``state_dir_for(record)`` names (an unreadable token: `AgentDown`)."""

    def peer(record: AgentRecord) -> AgentPeer:
        try:
            token = read_token(state_dir_for(record), caller)
            return AgentPeer(AgentClient(record.endpoint, token, expect=expect_for(record), timeout=timeout))
        except AgentCredentialError as exc:
            raise AgentDown(f"agent {record.agent_id}: {exc}") from None

    return peer
