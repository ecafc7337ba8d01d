"""The attestation gate in front of every unwrap for a workload (``KmsAdapter.release``).

A key's release policy names whose attestation results are trusted (the verifier's public
key and the audience its tokens carry) and the attestation policy the result's claims must
satisfy. ``release`` verifies the token (ES256 signature, expiry, audience), checks that the
recipient key is the one the enclave bound into its evidence (the token's ``cnf``),
re-evaluates the claims against the key's policy, and only then unwraps; the DEK leaves
encrypted to the recipient key with HPKE, never in plaintext.

Release policies are kept by a ``ReleasePolicyStore`` beside the KMS (Transit and AWS KMS
have nowhere to keep one; Azure keeps its own native release policy as well).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import AttestationError
from attestation.policy import Policy, parse_policy
from attestation.token import VerifiedResult, verify_result
from kms_adapters.errors import InvalidRequest, PolicyDenied
from sealing.handoff import RELEASE_CONTEXT as RELEASE_CONTEXT  # defined beside the agent that opens
from sealing.handoff import SUITE, HandoffKeyPair, load_public_key, release_info


@dataclass(frozen=True)
class ReleasePolicy:
    policy: Policy  # the attestation policy the claims must satisfy
    verifier_public_key_pem: bytes  # results signed by this key are trusted
    audience: str = "rekey-kms"

    @property
    def id(self) -> str:
        return self.policy.id

    def to_json(self) -> str:
        return json.dumps(
            {
                "policy": self.policy.to_dict(),
                "verifier_public_key": self.verifier_public_key_pem.decode("ascii"),
                "audience": self.audience,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ReleasePolicy:
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(
                policy=parse_policy(data["policy"]),
                verifier_public_key_pem=str(data["verifier_public_key"]).encode("ascii"),
                audience=str(data.get("audience", "rekey-kms")),
            )
        except (ValueError, KeyError, TypeError, AttestationError) as exc:
            raise InvalidRequest(f"stored release policy is unreadable: {exc}") from None

    def verifier_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_public_key(self.verifier_public_key_pem)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise InvalidRequest("release policy's verifier key is not an EC public key")
        return key


class ReleasePolicyStore(Protocol):
    def get(self, key_ref: str) -> ReleasePolicy | None: ...
    def put(self, key_ref: str, policy: ReleasePolicy) -> None: ...


class FileReleasePolicyStore:
    """One JSON file per key under ``directory`` (mode 0600, replaced atomically)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key_ref: str) -> Path:
        return self.directory / (hashlib.sha256(key_ref.encode()).hexdigest()[:32] + ".json")

    def get(self, key_ref: str) -> ReleasePolicy | None:
        try:
            text = self._path(key_ref).read_text()
        except FileNotFoundError:
            return None
        return ReleasePolicy.from_json(text)

    def put(self, key_ref: str, policy: ReleasePolicy) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".policy.")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(policy.to_json())
            os.replace(tmp, self._path(key_ref))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class MemoryReleasePolicyStore:
    def __init__(self) -> None:
        self._policies: dict[str, ReleasePolicy] = {}

    def get(self, key_ref: str) -> ReleasePolicy | None:
        return self._policies.get(key_ref)

    def put(self, key_ref: str, policy: ReleasePolicy) -> None:
        self._policies[key_ref] = policy


def check_release(
    policy: ReleasePolicy | None,
    attestation_result: str,
    recipient_public_key: bytes | None,
    *,
    now: datetime | None = None,
) -> VerifiedResult:
    """Raise ``PolicyDenied`` unless the token lets ``recipient_public_key`` receive the key.

    ``recipient_public_key`` None skips the key binding, for releases where the service itself
    encrypts to the key named in the token (Azure Secure Key Release)."""
    if policy is None:
        raise PolicyDenied(["the key has no release policy"])
    when = now or datetime.now(UTC)
    try:
        result = verify_result(
            attestation_result,
            public_key=policy.verifier_key(),
            audience=policy.audience,
            policy_id=None,
            now=when,
        )
    except AttestationError as exc:
        raise PolicyDenied([f"attestation result rejected: {exc}"]) from None
    if recipient_public_key is not None and not hmac.compare_digest(
        hashlib.sha256(recipient_public_key).hexdigest(), result.cnf_key_hash
    ):
        raise PolicyDenied(["the recipient key is not the key bound in the attestation result"])
    decision = policy.policy.evaluate(result.claims, now=when, nonce_checked=result.claims.nonce is not None)
    if not decision.allowed:
        raise PolicyDenied(decision.reasons)
    return result


def encrypt_for_recipient(dek: bytes, recipient_public_key: bytes, key_ref: str) -> bytes:
    """HPKE-encrypt a released DEK to the attested recipient key (info binds the key ref)."""
    return SUITE.encrypt(dek, load_public_key(recipient_public_key), info=release_info(key_ref))


def open_released(ciphertext: bytes, recipient: HandoffKeyPair, key_ref: str) -> bytes:
    """The recipient's side (inside the TEE): decrypt a released DEK."""
    return recipient.open(ciphertext, release_info(key_ref))


class ReleaseGate:
    """``set_release_policy`` and ``release`` for adapters that keep policies in a
    ``ReleasePolicyStore``. The adapter provides ``key_ref``, ``unwrap`` and ``release_store``."""

    key_ref: str
    release_store: ReleasePolicyStore

    def unwrap(self, wrapped: bytes) -> bytes:
        raise NotImplementedError

    def set_release_policy(self, policy: ReleasePolicy) -> None:
        self.release_store.put(self.key_ref, policy)

    def release(self, wrapped: bytes, attestation_result: str, recipient_public_key: bytes) -> bytes:
        check_release(self.release_store.get(self.key_ref), attestation_result, recipient_public_key)
        return encrypt_for_recipient(self.unwrap(wrapped), recipient_public_key, self.key_ref)
