"""The AWS adapter's release to a Nitro Enclave (`AwsKmsAdapter.release_for_nitro`), apart from
the KMS calls: binding the enclave's attestation document to the attestation result that passed
the gate, what to do with KMS's answer, and the key-policy statement with which KMS itself
refuses every other enclave.

Passing the document as ``Recipient`` makes KMS encrypt the DEK to the key inside it, so the
document must be bound before any KMS call (``check_document``): the result passed the key's
release policy with the recipient key as its ``cnf``; the document verifies (COSE signature,
chain to the pinned AWS Nitro root, valid now); it is the very document the result was issued
for (same evidence digest); its public key is the recipient key; and its claims (PCR0, PCRs,
debug) satisfy the policy too."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from attestation.errors import AttestationError
from attestation.nitro import NitroVerifier, cose
from attestation.policy import Policy
from attestation.token import VerifiedResult
from kms_adapters.errors import PolicyDenied, Unavailable
from kms_adapters.release import ReleasePolicy

__all__ = [
    "RECIPIENT_SID",
    "NitroRelease",
    "check_document",
    "recipient_parameter",
    "recipient_statement",
    "release_from_answer",
    "with_recipient_statement",
]

RECIPIENT_SID = "RekeyNitroRecipientAttestation"


@dataclass(frozen=True)
class NitroRelease:
    """What ``release_for_nitro`` returns. ``scheme`` says how ``ciphertext`` is encrypted:
    ``kms-recipient`` — KMS honoured ``Recipient`` and returned ``CiphertextForRecipient`` (CMS
    EnvelopedData to the RSA key in the attestation document); ``rsa-oaep`` — KMS returned
    plaintext (moto ignores ``Recipient``) and the adapter encrypted it to that same RSA key
    with RSAES-OAEP-SHA-256. Either way only the enclave's private key opens it."""

    scheme: Literal["kms-recipient", "rsa-oaep"]
    ciphertext: bytes


def check_document(
    policy: ReleasePolicy,
    result: VerifiedResult,
    recipient_public_key: bytes,
    attestation_document: bytes,
    verifier: NitroVerifier,
    when: datetime,
) -> None:
    """``PolicyDenied`` (every reason) unless the document is bound to ``result`` as the module
    says; ``result`` is what ``check_release`` returned for the same recipient key."""
    try:
        document = verifier.verify(attestation_document, at=when)
    except AttestationError as exc:
        raise PolicyDenied([f"the attestation document does not verify: {exc}"]) from None
    reasons = []
    if result.claims.platform != "nitro":
        reasons.append(f"the attestation result is for a {result.claims.platform} enclave, not Nitro")
    if not hmac.compare_digest(document.evidence_digest, result.claims.evidence_digest):
        reasons.append("the attestation document is not the one the attestation result was issued for")
    if not hmac.compare_digest(document.detail("public_key") or "", recipient_public_key.hex()):
        reasons.append("the attestation document's public key is not the recipient key")
    if reasons:
        raise PolicyDenied(reasons)
    decision = policy.policy.evaluate(document, now=when, nonce_checked=result.claims.nonce is not None)
    if not decision.allowed:
        raise PolicyDenied(decision.reasons)


def recipient_parameter(attestation_document: bytes) -> dict[str, Any]:
    """KMS Decrypt's ``Recipient`` for the (checked) document."""
    return {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": cose(attestation_document)}


def release_from_answer(response: dict[str, Any], recipient_public_key: bytes) -> NitroRelease:
    """KMS's answer to a Decrypt with ``Recipient`` as a release: ``CiphertextForRecipient`` as
    it is; plaintext (a KMS that ignores ``Recipient``, such as moto) encrypted to the document's
    RSA key with RSAES-OAEP-SHA-256, as KMS would have."""
    sealed = response.get("CiphertextForRecipient")
    if isinstance(sealed, bytes | bytearray) and sealed:
        return NitroRelease("kms-recipient", bytes(sealed))
    plaintext = response.get("Plaintext")
    if not isinstance(plaintext, bytes | bytearray):
        raise Unavailable("AWS KMS returned neither CiphertextForRecipient nor plaintext")
    try:
        key = serialization.load_der_public_key(recipient_public_key)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise PolicyDenied(["the attestation document's public key is not an RSA key of 2048 bits or more"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    return NitroRelease("rsa-oaep", key.encrypt(bytes(plaintext), oaep))


def recipient_statement(policy: Policy) -> dict[str, Any] | None:
    """The key-policy statement for the Nitro rules of ``policy``: deny ``kms:Decrypt`` to a
    ``Recipient`` that no Nitro rule can admit: its image (``kms:RecipientAttestation:
    ImageSha384``, PCR0) is none of the measurement rules' and its signing certificate
    (``kms:RecipientAttestation:PCR8``) none of the signer rules' (IAM ANDs the two, so
    either allowed value lets the request through to the gate). A Deny never grants anything, so
    adding it cannot lock out the key's administrators or the worker (their decrypts carry no
    attestation: the ``Null`` condition). None when the policy has no Nitro rule. Further PCRs
    and details are enforced by the gate; the Allow statement for the enclave's role can pin
    them too (``attestation.nitro.nitro_recipient_conditions``)."""
    rules = [rule for rule in policy.rules if rule.platform == "nitro"]
    if not rules:
        return None
    images = sorted({m for rule in rules if rule.measurements for m in rule.measurements})
    signers = sorted({rule.signer for rule in rules if rule.signer is not None})
    refused: dict[str, list[str]] = {}
    if images:
        refused["kms:RecipientAttestation:ImageSha384"] = images
    if signers:
        refused["kms:RecipientAttestation:PCR8"] = signers
    return {
        "Sid": RECIPIENT_SID,
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {
            "StringNotEqualsIgnoreCase": refused,
            "Null": {"kms:RecipientAttestation:ImageSha384": "false"},
        },
    }


def with_recipient_statement(key_policy: str, policy: ReleasePolicy | None) -> str | None:
    """The key policy (JSON) with rekey's statement replaced by ``policy``'s (or removed), the
    rest kept as it is; None when that changes nothing."""
    statement = recipient_statement(policy.policy) if policy is not None else None
    current = json.loads(key_policy)
    statements = [s for s in current.get("Statement", []) if s.get("Sid") != RECIPIENT_SID]
    if statement is not None:
        statements.append(statement)
    if statements == current.get("Statement", []):
        return None
    current["Statement"] = statements
    return json.dumps(current)
