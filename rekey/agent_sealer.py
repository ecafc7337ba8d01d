"""An enclave agent as the `sealing.state.EnclaveSealer` of hardware-sealed state: ``/v1/seal``
and ``/v1/unseal`` over `rekey.agent_auth.AgentClient` (signed requests, proven answers).

`AgentSealer.connect` asks the agent who it is first (``/v1/identity``: its generation and host
id, in an answer the agent proves with the caller's token), so that the host check of
`sealing.state.SealedState.get` happens before any blob is sent. Every failure is one line:
`sealing.state.EnclaveUnavailable` when the agent cannot be reached or does not prove its answer,
`sealing.state.EnclaveRefused` when it refuses."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

from rekey.agent_auth import AgentCallError, AgentClient, AgentUnproven
from rekey.ratls_transport import RatlsUntrusted
from sealing.names import InvalidName, check_generation_id, check_host_id
from sealing.state import EnclaveRefused, EnclaveUnavailable, SealPolicy
from sealing.tee.platform import tee_key_ref

__all__ = ["AgentSealer"]


class AgentSealer:
    """The agent at ``client.url`` (see `connect`)."""

    def __init__(
        self,
        client: AgentClient,
        *,
        generation: str,
        host_id: str,
        platform: str,
        release_token: Callable[[AgentSealer], str] | None = None,
    ) -> None:
        self._client = client
        self._generation = generation
        self._host_id = host_id
        self._key_ref = tee_key_ref(platform)
        self._release_token = release_token

    @classmethod
    def connect(
        cls, client: AgentClient, release_token: Callable[[AgentSealer], str] | None = None
    ) -> AgentSealer:
        """Ask the agent for its identity; `EnclaveUnavailable` if it does not answer as an agent.
        ``release_token``: how a release token for this agent is made (it attests through
        `attest`), for `open_kms`."""
        identity = cls._call(client, "/v1/identity", None)
        try:
            generation = check_generation_id(identity.get("id"))
            host_id = check_host_id(identity.get("host_id"))
            platform = identity.get("platform")
            if not isinstance(platform, str) or not platform.isalnum():
                raise ValueError("no platform")
        except (InvalidName, ValueError):
            raise EnclaveUnavailable(
                f"the agent at {client.url} did not answer with a generation id, host id and platform"
            ) from None
        return cls(
            client, generation=generation, host_id=host_id, platform=platform, release_token=release_token
        )

    @property
    def host_id(self) -> str:
        return self._host_id

    @property
    def generation(self) -> str:
        return self._generation

    @property
    def key_ref(self) -> str:
        return self._key_ref

    @property
    def where(self) -> str:
        return f"the agent at {self._client.url}"

    @staticmethod
    def _call(client: AgentClient, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        try:
            return client.call(path, body)
        except AgentUnproven as exc:
            raise EnclaveUnavailable(f"the agent at {client.url}: {exc.message}") from None
        except AgentCallError as exc:
            if exc.status >= 500:
                raise EnclaveUnavailable(f"the agent at {client.url} failed: {exc}") from None
            raise EnclaveRefused(f"the agent at {client.url} refused: {exc}") from None
        except RatlsUntrusted as exc:  # before OSError: another build or an impostor, not an outage
            raise EnclaveRefused(
                f"the agent at {client.url} is not the attested agent expected: {exc.strerror}"
            ) from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise EnclaveUnavailable(f"cannot reach the agent at {client.url}: {reason}") from None

    def _bytes(self, answer: dict[str, Any], field: str) -> bytes:
        value = answer.get(field)
        try:
            if not isinstance(value, str):
                raise ValueError
            return base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error):
            raise EnclaveUnavailable(f"{self.where} answered without a base64 {field!r}") from None

    def seal(
        self, *, namespace: str, name: str, data: bytes, policy: SealPolicy, blob_id: str, version: int
    ) -> bytes:
        body = {
            "namespace": namespace,
            "name": name,
            "policy": policy,
            "data": base64.b64encode(data).decode("ascii"),
            "blob_id": blob_id,
            "version": version,
        }
        return self._bytes(self._call(self._client, "/v1/seal", body), "blob")

    def unseal(self, blob: bytes) -> bytes:
        body = {"blob": base64.b64encode(blob).decode("ascii")}
        return self._bytes(self._call(self._client, "/v1/unseal", body), "data")

    def attest(self, nonce: bytes) -> tuple[bytes, bytes]:
        """(evidence over ``nonce`` and the agent's key, that key)."""
        answer = self._call(self._client, "/v1/attest", {"nonce": base64.b64encode(nonce).decode("ascii")})
        return self._bytes(answer, "evidence"), self._bytes(answer, "public_key")

    def open_kms(self, blob: bytes) -> bytes:
        """Open a KMS-wrapped blob in the agent (``/v1/open``): it presents a release token made
        for it just now, the key's gate releases the DEK encrypted to the agent's key."""
        if self._release_token is None:
            raise EnclaveRefused(f"{self.where} was connected without a way to make release tokens")
        token = self._release_token(self)
        body = {"blob": base64.b64encode(blob).decode("ascii"), "token": token}
        return self._bytes(self._call(self._client, "/v1/open", body), "data")
