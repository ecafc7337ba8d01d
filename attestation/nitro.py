"""Verifier for AWS Nitro Enclaves attestation documents (platform ``nitro``).

A document is a COSE_Sign1 (RFC 9052; untagged, or with CBOR tag 18) whose protected header is
``{1: -35}`` (ES384) and whose payload is the NSM attestation document, a CBOR map: ``module_id``,
``digest`` (``"SHA384"``), ``timestamp`` (ms since the epoch), ``pcrs`` ({index: 48 bytes}),
``certificate`` (the signing certificate, DER), ``cabundle`` ([root, ..., issuer of the signing
certificate], DER), and the optional ``public_key``, ``user_data`` and ``nonce``. It arrives as raw
CBOR or as base64 of it (standard or URL-safe alphabet, padding optional); the first byte tells
which (a COSE_Sign1 starts with 0x84 or 0xd2, base64 text never does).

Checks, in order:

1. Structure (``MalformedEvidence``): size caps, CBOR with bounded nesting and no indefinite
   lengths or duplicate map keys, the COSE array encoded exactly as cbor2 re-encodes it (so no
   trailing bytes and no alternative encodings of the unsigned envelope), every payload field of
   the expected type and size.
2. Chain (``ChainInvalid``): ``cabundle[0]`` is the pinned AWS Nitro Enclaves Root-G1 (byte for
   byte), each later certificate and then the signing certificate is issued by the one before it,
   every certificate is valid at ``at``, the CA certificates are CAs with keyCertSign within their
   path length, and the signing certificate is an end-entity P-384 key allowed to sign. The
   certificates live about three hours, so stored documents verify only at a time inside that
   window, e.g. their own ``timestamp``.
3. Signature (``EvidenceSignatureInvalid``): ECDSA P-384 / SHA-384 with the signing certificate's
   key over ``Sig_structure = ["Signature1", protected, b"", payload]``; COSE carries the
   signature as raw ``r || s`` (96 bytes).

Mapping to ``Claims``: ``measurement`` is PCR0 (the image digest that AWS KMS calls
``ImageSha384``), ``signer`` PCR8 (the hash of the image-signing certificate, zeros for an unsigned
image), ``product_id`` and ``svn`` 0 (Nitro has neither), ``tcb_status`` ``UpToDate`` (AWS signs
no TCB level), ``evidence_time`` the document timestamp and ``evidence_digest`` the SHA-256 of
the COSE bytes (the same for the raw and the base64 form). ``debug`` is true when any of PCR0,
PCR1 or PCR2 is all zeros: an enclave started with ``--debug-mode`` gets all-zero PCR0-2 and is
still signed by AWS, so only a policy with ``debug_allowed`` accepts it.

``report_data``: the NSM lets the enclave bind three fields, ``user_data``, ``nonce`` and
``public_key``. rekey's binding is ``SHA-256(nonce || key)``, which the enclave puts in
``user_data``; ``report_data`` is therefore ``user_data`` padded with zeros to 64 bytes (64 zero
bytes when absent). A ``user_data`` longer than 64 bytes is reported in full, which the verifier
core's binding check refuses (it expects exactly 64 bytes). ``nonce``, ``public_key`` and
``user_data`` are also in ``details`` as hex, with ``module_id``, ``digest`` and every PCR
present (``pcr0`` ... ``pcr31``).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation.certs import CERT_ERRORS, ca_extensions, check_validity
from attestation.claims import Claims
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence

__all__ = [
    "PINNED_ROOT_SHA256",
    "NitroVerifier",
    "VerifiedNitroChain",
    "cose",
    "nitro_recipient_conditions",
    "pinned_root_pem",
]

#: SHA-256 of the DER of AWS Nitro Enclaves Root-G1: the fingerprint AWS publishes.
PINNED_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
_ROOT_PATH = Path(__file__).resolve().parent / "roots" / "aws_nitro_root_g1.pem"

MAX_DOCUMENT_BYTES = 32 * 1024  # COSE bytes; real documents are under 8 KiB with every field at its maximum
MAX_BASE64_BYTES = MAX_DOCUMENT_BYTES * 4 // 3 + 1024  # base64 of the above, with line breaks
MAX_CBOR_DEPTH = 8  # the deepest real item is a PCR value: COSE array > payload map > pcrs map > bstr
MAX_CABUNDLE = 8
MAX_CERT_BYTES = 4096
MAX_BOUND_BYTES = 1024  # NSM limit for user_data, nonce and public_key
MAX_MODULE_ID = 256
MAX_PCR_INDEX = 31
PCR_BYTES = 48  # SHA-384
SIGNATURE_BYTES = 96  # P-384 r || s
REPORT_DATA_SIZE = 64
_MAX_MILLIS = 253402300799999  # 9999-12-31T23:59:59.999Z, the last millisecond datetime holds
_ES384 = -35
_COSE_TAG = 18

# Errors that reading a tampered or hostile certificate can provoke.


@functools.cache
def pinned_root_pem() -> bytes:
    """The AWS Nitro Enclaves Root-G1 shipped in ``attestation/roots/``, checked against its
    published SHA-256 fingerprint (a changed file is refused, not trusted)."""
    pem = _ROOT_PATH.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    if hashlib.sha256(der).hexdigest() != PINNED_ROOT_SHA256:
        raise RuntimeError(f"{_ROOT_PATH.name} is not the AWS Nitro Enclaves Root-G1 (fingerprint mismatch)")
    return pem


class _Document(NamedTuple):
    cose: bytes  # the COSE_Sign1 bytes (decoded from base64 if need be)
    protected: bytes
    payload: bytes
    signature: bytes
    fields: dict[str, Any]  # the payload map, types checked
    certificate: bytes
    cabundle: tuple[bytes, ...]


def _cbor(data: bytes, what: str) -> Any:
    try:
        return cbor2.loads(data, max_depth=MAX_CBOR_DEPTH, allow_indefinite=False, allow_duplicate_keys=False)
    # cbor2 raises its own errors and, for some tagged items, whatever the tag's decoder raises.
    except Exception:
        raise MalformedEvidence(f"the nitro {what} is not valid CBOR") from None


def _cose_bytes(evidence: bytes) -> bytes:
    """Raw COSE bytes from raw or base64 evidence."""
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence("nitro evidence must be bytes")
    data = bytes(evidence)
    if not data:
        raise MalformedEvidence("nitro evidence is empty")
    if data[0] in (0x84, 0xD2):
        if len(data) > MAX_DOCUMENT_BYTES:
            raise MalformedEvidence(f"nitro attestation document is larger than {MAX_DOCUMENT_BYTES} bytes")
        return data
    if len(data) > MAX_BASE64_BYTES:
        raise MalformedEvidence(f"nitro attestation document is larger than {MAX_DOCUMENT_BYTES} bytes")
    text = b"".join(data.split())  # line breaks and spaces
    text = text.replace(b"-", b"+").replace(b"_", b"/")
    text += b"=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEvidence("nitro evidence is neither COSE_Sign1 CBOR nor base64 of it") from None
    if not raw or raw[0] not in (0x84, 0xD2):
        raise MalformedEvidence("nitro evidence decodes from base64 to something other than a COSE_Sign1")
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise MalformedEvidence(f"nitro attestation document is larger than {MAX_DOCUMENT_BYTES} bytes")
    return raw


def cose(evidence: bytes) -> bytes:
    """The document's COSE_Sign1 bytes from raw or base64 evidence (what KMS takes as a
    ``Recipient``'s ``AttestationDocument``). Raises ``MalformedEvidence``."""
    return _cose_bytes(evidence)


def _optional_bytes(fields: dict[str, Any], name: str) -> bytes | None:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise MalformedEvidence(f"nitro attestation document {name} is not a byte string")
    if len(value) > MAX_BOUND_BYTES:
        raise MalformedEvidence(f"nitro attestation document {name} is longer than {MAX_BOUND_BYTES} bytes")
    return value


def _check_fields(fields: object) -> dict[str, Any]:
    if not isinstance(fields, dict) or not all(isinstance(key, str) for key in fields):
        raise MalformedEvidence("the nitro payload is not a map with text keys")
    module_id = fields.get("module_id")
    if not isinstance(module_id, str) or not 0 < len(module_id) <= MAX_MODULE_ID:
        raise MalformedEvidence("nitro attestation document module_id is missing or not a short text")
    if fields.get("digest") != "SHA384":
        raise MalformedEvidence("nitro attestation document digest is not SHA384")
    timestamp = fields.get("timestamp")
    if type(timestamp) is not int or not 0 < timestamp <= _MAX_MILLIS:
        raise MalformedEvidence("nitro attestation document timestamp is missing or out of range")
    pcrs = fields.get("pcrs")
    if not isinstance(pcrs, dict) or not 0 < len(pcrs) <= MAX_PCR_INDEX + 1:
        raise MalformedEvidence("nitro attestation document pcrs is missing or not a map of up to 32 PCRs")
    for index, value in pcrs.items():
        if type(index) is not int or not 0 <= index <= MAX_PCR_INDEX:
            raise MalformedEvidence("nitro attestation document has a PCR index outside 0..31")
        if not isinstance(value, bytes) or len(value) != PCR_BYTES:
            raise MalformedEvidence(f"nitro attestation document PCR{index} is not {PCR_BYTES} bytes")
    if 0 not in pcrs:
        raise MalformedEvidence("nitro attestation document has no PCR0")
    certificate = fields.get("certificate")
    if not isinstance(certificate, bytes) or not 0 < len(certificate) <= MAX_CERT_BYTES:
        raise MalformedEvidence("nitro attestation document certificate is missing or too large")
    cabundle = fields.get("cabundle")
    if not isinstance(cabundle, list) or not 0 < len(cabundle) <= MAX_CABUNDLE:
        raise MalformedEvidence(f"nitro attestation document cabundle is not a list of 1 to {MAX_CABUNDLE}")
    for cert in cabundle:
        if not isinstance(cert, bytes) or not 0 < len(cert) <= MAX_CERT_BYTES:
            raise MalformedEvidence("nitro attestation document cabundle holds a non-certificate")
    for name in ("public_key", "user_data", "nonce"):
        _optional_bytes(fields, name)
    return fields


def _parse(evidence: bytes) -> _Document:
    """Structure only. Raises ``MalformedEvidence``."""
    cose = _cose_bytes(evidence)
    outer = _cbor(cose, "attestation document")
    envelope = outer
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != _COSE_TAG:
            raise MalformedEvidence(f"nitro evidence has CBOR tag {outer.tag}, not 18 (COSE_Sign1)")
        envelope = outer.value
    # Inside a tag cbor2 builds immutable containers: a tuple and a frozendict.
    if not isinstance(envelope, list | tuple) or len(envelope) != 4:
        raise MalformedEvidence("nitro evidence is not a COSE_Sign1 array of 4")
    protected, unprotected, payload, signature = envelope
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise MalformedEvidence("nitro COSE_Sign1 fields have the wrong types")
    if not isinstance(unprotected, Mapping) or unprotected:
        raise MalformedEvidence("nitro COSE_Sign1 unprotected header is not empty")
    if len(signature) != SIGNATURE_BYTES:
        raise MalformedEvidence(f"nitro COSE_Sign1 signature is not {SIGNATURE_BYTES} bytes (ES384 r || s)")
    try:
        canonical = cbor2.dumps(outer)
    except Exception:  # a hostile tagged value may not re-encode
        raise MalformedEvidence("nitro COSE_Sign1 cannot be re-encoded") from None
    if canonical != cose:
        raise MalformedEvidence("nitro COSE_Sign1 has trailing bytes or a non-minimal encoding")
    header = _cbor(protected, "protected header")
    if not isinstance(header, dict) or header.get(1) != _ES384 or 2 in header:
        raise MalformedEvidence("nitro COSE_Sign1 protected header is not {1: -35} (ES384)")
    fields = _check_fields(_cbor(payload, "payload"))
    return _Document(
        cose, protected, payload, signature, fields, fields["certificate"], tuple(fields["cabundle"])
    )


def _chain_digest(document: _Document) -> bytes:
    """SHA-256 over the cabundle and signing certificate DER, each length-prefixed."""
    digest = hashlib.sha256()
    for der in (*document.cabundle, document.certificate):
        digest.update(len(der).to_bytes(4, "big"))
        digest.update(der)
    return digest.digest()


def _load_cert(der: bytes, what: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        signature = cert.signature
    except CERT_ERRORS:
        raise ChainInvalid(f"the {what} is not a DER X.509 certificate") from None
    # The parser accepts a signature BIT STRING with unused bits if they are zero, so one
    # certificate would have several encodings that all verify: accept only whole bytes.
    if len(der) <= len(signature) or der[-len(signature) - 1] != 0:
        raise ChainInvalid(f"the {what}'s signature is not a whole number of bytes")
    return cert


def _is_p384(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


@dataclass(frozen=True)
class VerifiedNitroChain:
    """A cabundle + signing certificate that lead from the pinned root; usable from
    ``not_before`` to ``not_after`` (the common validity window of its certificates)."""

    digest: bytes  # see _chain_digest
    key: ec.EllipticCurvePublicKey
    not_before: datetime
    not_after: datetime


class NitroVerifier:
    """``PlatformVerifier`` and ``CachingPlatformVerifier`` for platform ``nitro``."""

    platform: str = "nitro"

    def __init__(self, *, root_pem: bytes | None = None) -> None:
        """``root_pem``: the trusted root; default the pinned AWS Nitro Enclaves Root-G1."""
        pem = pinned_root_pem() if root_pem is None else root_pem
        try:
            root = x509.load_pem_x509_certificate(pem)
            root.verify_directly_issued_by(root)
            constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
        except (*CERT_ERRORS, InvalidSignature, x509.ExtensionNotFound):
            raise ValueError("root_pem is not a self-signed CA certificate") from None
        if not constraints.ca:
            raise ValueError("root_pem is not a CA certificate")
        self._root = root
        self._root_der = root.public_bytes(serialization.Encoding.DER)

    def __repr__(self) -> str:
        fingerprint = hashlib.sha256(self._root_der).hexdigest()
        return f"NitroVerifier(root_sha256={fingerprint[:16]}...)"

    # -- PlatformVerifier -----------------------------------------------------------------------

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        return self.verify_with_chain(evidence, self.verify_chain(evidence, at), at)

    def chain_cache_key(self, evidence: bytes) -> bytes:
        """SHA-256 of the cabundle and signing certificate DER: every document one enclave signs
        with the same certificate shares it."""
        return _chain_digest(_parse(evidence))

    # -- CachingPlatformVerifier ----------------------------------------------------------------

    def verify_chain(self, evidence: bytes, at: datetime) -> VerifiedNitroChain:
        _require_aware(at)
        document = _parse(evidence)
        key, not_before, not_after = self._check_chain(document, at)
        return VerifiedNitroChain(_chain_digest(document), key, not_before, not_after)

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        """One ECDSA P-384 check with the verified chain's key, then the claims."""
        _require_aware(at)
        document = _parse(evidence)
        if not isinstance(chain, VerifiedNitroChain) or not hmac.compare_digest(
            chain.digest, _chain_digest(document)
        ):
            raise ChainInvalid("nitro document carries other certificates than the verified chain")
        if not chain.not_before <= at <= chain.not_after:
            raise ChainInvalid(
                f"the nitro certificate chain is valid {chain.not_before.isoformat()} to"
                f" {chain.not_after.isoformat()}, not at {at.isoformat()}"
            )
        r = int.from_bytes(document.signature[:48], "big")
        s = int.from_bytes(document.signature[48:], "big")
        to_be_signed = cbor2.dumps(["Signature1", document.protected, b"", document.payload])
        try:
            chain.key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise EvidenceSignatureInvalid(
                "nitro document signature does not verify with its signing certificate"
            ) from None
        return _claims(document)

    # -- the chain ------------------------------------------------------------------------------

    def _check_chain(
        self, document: _Document, at: datetime
    ) -> tuple[ec.EllipticCurvePublicKey, datetime, datetime]:
        if not hmac.compare_digest(document.cabundle[0], self._root_der):
            raise ChainInvalid("nitro cabundle does not start at the trusted AWS Nitro root")
        certs = [self._root]
        certs += [
            _load_cert(der, f"cabundle[{i}] certificate")
            for i, der in enumerate(document.cabundle[1:], start=1)
        ]
        certs.append(_load_cert(document.certificate, "signing certificate"))
        names = ["root", *(f"cabundle[{i}] certificate" for i in range(1, len(document.cabundle)))]
        names.append("signing certificate")
        leaf_index = len(certs) - 1
        for index, (cert, name) in enumerate(zip(certs, names, strict=True)):
            check_validity(cert, at, name)
            constraints, usage = ca_extensions(cert, name)
            if index < leaf_index:
                if not constraints.ca or not usage.key_cert_sign:
                    raise ChainInvalid(f"the {name} is not a CA certificate with keyCertSign")
                below = leaf_index - index - 1  # CA certificates between this one and the leaf
                if constraints.path_length is not None and below > constraints.path_length:
                    raise ChainInvalid(f"the {name}'s path length {constraints.path_length} is exceeded")
            else:
                if constraints.ca or not usage.digital_signature:
                    raise ChainInvalid("the nitro signing certificate is not an end-entity signing key")
            if index:
                try:
                    cert.verify_directly_issued_by(certs[index - 1])
                except (*CERT_ERRORS, InvalidSignature):
                    raise ChainInvalid(f"the {name} is not issued by the {names[index - 1]}") from None
        try:
            key = certs[-1].public_key()
        except CERT_ERRORS:
            raise ChainInvalid("the nitro signing certificate's key cannot be read") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not _is_p384(key):
            raise ChainInvalid("the nitro signing key is not an ECDSA P-384 key")
        not_before = max(cert.not_valid_before_utc for cert in certs)
        not_after = min(cert.not_valid_after_utc for cert in certs)
        return key, not_before, not_after


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")


def _claims(document: _Document) -> Claims:
    fields = document.fields
    pcrs: dict[int, bytes] = fields["pcrs"]
    zero = bytes(PCR_BYTES)
    debug = any(pcrs.get(index, zero) == zero for index in (0, 1, 2))
    user_data = _optional_bytes(fields, "user_data")
    nonce = _optional_bytes(fields, "nonce")
    public_key = _optional_bytes(fields, "public_key")
    report_data = (user_data or b"").ljust(REPORT_DATA_SIZE, b"\0")
    details: dict[str, str] = {f"pcr{index}": value.hex() for index, value in pcrs.items()}
    details["module_id"] = fields["module_id"]
    details["digest"] = fields["digest"]
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None:
            details[name] = value.hex()
    return Claims(
        platform="nitro",
        measurement=pcrs[0].hex(),
        signer=pcrs.get(8, zero).hex(),
        product_id=0,
        svn=0,
        debug=debug,
        tcb_status="UpToDate",
        report_data=report_data.hex(),
        evidence_digest=hashlib.sha256(document.cose).hexdigest(),
        evidence_time=datetime.fromtimestamp(fields["timestamp"] / 1000, UTC),
        details=tuple(sorted(details.items())),
    )


#: PCRs a KMS key policy pins by default besides PCR0: the kernel and boot ramfs (1), the
#: application (2) and the image-signing certificate (8). PCR3 (the parent's IAM role) and PCR4
#: (the parent instance id) tie a key to one deployment or one instance; ask for them explicitly.
DEFAULT_RECIPIENT_PCRS = (1, 2, 8)


def nitro_recipient_conditions(
    claims: Claims, pcrs: tuple[int, ...] = DEFAULT_RECIPIENT_PCRS
) -> dict[str, Any]:
    """The ``Condition`` block of an AWS KMS key-policy statement that lets only an enclave with
    these measurements receive key material (``Recipient`` with an attestation document):
    ``kms:RecipientAttestation:ImageSha384`` for PCR0 and ``kms:RecipientAttestation:PCR<n>`` for
    each of ``pcrs`` the claims carry that is not all zeros (an all-zero PCR8 means an unsigned
    image: nothing to pin). Values are lowercase hex, compared with ``StringEqualsIgnoreCase`` as
    the AWS KMS documentation does. Debug claims are refused: their zero PCRs would admit every
    debug enclave."""
    if claims.platform != "nitro":
        raise ValueError(f"claims are for platform {claims.platform!r}, not nitro")
    if claims.debug:
        raise ValueError("claims are from a debug-mode enclave; a key policy must not admit all-zero PCRs")
    zero = "0" * (2 * PCR_BYTES)
    values = {"kms:RecipientAttestation:ImageSha384": claims.measurement}
    for index in pcrs:
        if not 0 < index <= MAX_PCR_INDEX:
            raise ValueError(f"PCR index {index} is not in 1..{MAX_PCR_INDEX} (PCR0 is ImageSha384)")
        value = claims.detail(f"pcr{index}")
        if value is not None and value != zero:
            values[f"kms:RecipientAttestation:PCR{index}"] = value
    return {"StringEqualsIgnoreCase": values}
