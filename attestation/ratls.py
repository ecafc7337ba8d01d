"""Attested TLS (RA-TLS) certificates: a TLS key whose hash the enclave's evidence binds.

An agent makes, at start-up, a fresh P-256 key pair and a self-signed X.509 certificate for it
that carries the enclave's evidence in a non-critical extension. The evidence's report data is
``SHA-256(DER SubjectPublicKeyInfo of the certificate key)`` padded with zeros to 64 bytes
(`attestation.verifier.expected_report_data` with no nonce and the SPKI DER as the key), so a
relying party that verified the evidence and sees the peer prove possession of the certificate
key in the TLS handshake (CertificateVerify) knows it talks to that enclave. The certificate's
own signature proves nothing about the enclave (anyone can self-sign); it is checked only so
that one certificate has one meaning.

Extension OIDs (the value is the extension's OCTET STRING contents):

* SGX quote: the Intel/Gramine RA-TLS OID ``1.2.840.113741.1.13.1.0``, the raw quote;
* TDX quote: ``1.2.840.113741.1.5.5.1.6``, the raw quote;
* sim evidence: ``2.25.182422565605098524787968447378742820951``, the raw evidence. The 2.25 arc
  is the UUID arc (ITU-T X.667): anyone may mint an OID there from a random (version 4) UUID
  without registering it; this one is ``893d4ee3-c690-467d-ab8b-b9d4fb8bc057`` as an integer;
* every other platform (SEV-SNP, Nitro, ...): the TCG DICE conceptual message wrapper
  ``2.23.133.5.4.9`` (the carrier of the IETF/CoCo interoperable RA-TLS work). Its value here is
  a minimal wrapper, ``SEQUENCE { UTF8String platform, OCTET STRING evidence }``: the platform
  name stands where the wrapper names the content type. A reader of this module is its only
  consumer, so no registry of content types is needed (a deviation from the full CMW, which
  names a media type or CoAP content format).

A certificate with none of these, or more than one, is `MalformedEvidence`; so is any DER this
module cannot read. Every failure is a one-line typed error (`attestation.errors`).
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from attestation.certs import CERT_ERRORS
from attestation.claims import Claims
from attestation.errors import (
    AttestationError,
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
    NonceMismatch,
    PolicyDenied,
)
from attestation.platform import PlatformVerifier
from attestation.policy import Policy
from attestation.verifier import REPORT_DATA_SIZE, expected_report_data

__all__ = [
    "CERT_LIFETIME",
    "OID_CMW",
    "OID_SGX_QUOTE",
    "OID_SIM_EVIDENCE",
    "OID_TDX_QUOTE",
    "RatlsIdentity",
    "RatlsVerifier",
    "certificate_expiry",
    "check_binding",
    "evidence_from_certificate",
    "make_identity",
    "report_data_for",
]

OID_SGX_QUOTE = ObjectIdentifier("1.2.840.113741.1.13.1.0")
OID_TDX_QUOTE = ObjectIdentifier("1.2.840.113741.1.5.5.1.6")
OID_CMW = ObjectIdentifier("2.23.133.5.4.9")
OID_SIM_EVIDENCE = ObjectIdentifier("2.25.182422565605098524787968447378742820951")
_RAW_OIDS: dict[str, ObjectIdentifier] = {"sgx": OID_SGX_QUOTE, "tdx": OID_TDX_QUOTE, "sim": OID_SIM_EVIDENCE}
_PLATFORM_OF: dict[ObjectIdentifier, str] = {oid: name for name, oid in _RAW_OIDS.items()}
_PLATFORM_NAMES = frozenset({"sim", "sgx", "sev-snp", "tdx", "nitro"})

CERT_LIFETIME = timedelta(hours=24)
"""A certificate is valid until its agent's start plus this (a restart makes a new one)."""
BACKDATE = timedelta(minutes=1)
MAX_CERT_BYTES = 256 * 1024
MAX_EVIDENCE_BYTES = 128 * 1024

# What a hostile DER certificate can provoke in the parser.


def _spki(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise MalformedEvidence("the RA-TLS certificate key is not an EC key")
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def report_data_for(spki_der: bytes) -> bytes:
    """The 64 bytes an enclave binds for the TLS key with this SubjectPublicKeyInfo."""
    return expected_report_data(None, spki_der)


# ------------------------------------------------------------------------------ minimal DER


def _der_len(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _read_tlv(data: bytes, pos: int, tag: int, what: str) -> tuple[bytes, int]:
    """(value, next position) of the DER element of ``tag`` at ``pos``; definite, minimal lengths."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise MalformedEvidence(f"RA-TLS evidence wrapper: {what} is missing")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise MalformedEvidence(f"RA-TLS evidence wrapper: {what} has a bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise MalformedEvidence(f"RA-TLS evidence wrapper: {what} length is not minimal")
        pos += count
    if pos + length > len(data):
        raise MalformedEvidence(f"RA-TLS evidence wrapper: {what} is truncated")
    return data[pos : pos + length], pos + length


def _wrap(platform: str, evidence: bytes) -> bytes:
    return _tlv(0x30, _tlv(0x0C, platform.encode("ascii")) + _tlv(0x04, evidence))


def _unwrap(value: bytes) -> tuple[str, bytes]:
    body, end = _read_tlv(value, 0, 0x30, "the SEQUENCE")
    if end != len(value):
        raise MalformedEvidence("RA-TLS evidence wrapper has trailing bytes")
    name, pos = _read_tlv(body, 0, 0x0C, "the platform name")
    evidence, pos = _read_tlv(body, pos, 0x04, "the evidence")
    if pos != len(body):
        raise MalformedEvidence("RA-TLS evidence wrapper has unexpected fields")
    try:
        platform = name.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedEvidence("RA-TLS evidence wrapper names no known platform") from None
    if platform not in _PLATFORM_NAMES or platform in _RAW_OIDS:
        raise MalformedEvidence("RA-TLS evidence wrapper names no known platform")
    return platform, evidence


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True, repr=False)
class RatlsIdentity:
    """A TLS key and its RA-TLS certificate (DER). ``repr`` never shows the key."""

    cert_der: bytes
    key: ec.EllipticCurvePrivateKey
    platform: str
    not_after: datetime

    def key_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER, for the TLS library only."""
        return self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"RatlsIdentity(platform={self.platform!r}, not_after={self.not_after.isoformat()})"


def make_identity(
    platform: str,
    report: Callable[[bytes], bytes],
    *,
    now: datetime | None = None,
    lifetime: timedelta = CERT_LIFETIME,
    common_name: str = "rekey RA-TLS",
) -> RatlsIdentity:
    """A fresh P-256 key and its self-signed certificate whose extension carries
    ``report(report_data)``: the platform's evidence over the key's SPKI hash."""
    if platform not in _PLATFORM_NAMES:
        raise ValueError(f"unknown platform {platform!r}")
    start = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    evidence = report(report_data_for(_spki(key.public_key())))
    if platform in _RAW_OIDS:
        extension = x509.UnrecognizedExtension(_RAW_OIDS[platform], evidence)
    else:
        extension = x509.UnrecognizedExtension(OID_CMW, _wrap(platform, evidence))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_after = start + lifetime
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(extension, critical=False)
        .sign(key, hashes.SHA256())
    )
    return RatlsIdentity(
        cert.public_bytes(serialization.Encoding.DER), key, platform, cert.not_valid_after_utc
    )


def _load(cert_der: bytes) -> x509.Certificate:
    if not isinstance(cert_der, bytes | bytearray) or not 0 < len(cert_der) <= MAX_CERT_BYTES:
        raise MalformedEvidence("the RA-TLS certificate is empty or too large")
    try:
        return x509.load_der_x509_certificate(bytes(cert_der))
    except CERT_ERRORS:
        raise MalformedEvidence("the RA-TLS certificate is not DER X.509") from None


def evidence_from_certificate(cert_der: bytes) -> tuple[str, bytes]:
    """(platform, evidence) the certificate's RA-TLS extension carries."""
    cert = _load(cert_der)
    try:
        extensions = list(cert.extensions)
    except CERT_ERRORS:
        raise MalformedEvidence("the RA-TLS certificate's extensions cannot be read") from None
    found = [e for e in extensions if e.oid in _PLATFORM_OF or e.oid == OID_CMW]
    if not found:
        raise MalformedEvidence("the certificate carries no RA-TLS evidence extension")
    if len(found) > 1:
        raise MalformedEvidence("the certificate carries more than one RA-TLS evidence extension")
    extension = found[0]
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - OIDs cryptography knows
        raise MalformedEvidence("the RA-TLS evidence extension has an unexpected type")
    if extension.oid == OID_CMW:
        platform, evidence = _unwrap(value.value)
    else:
        platform, evidence = _PLATFORM_OF[extension.oid], value.value
    if not evidence or len(evidence) > MAX_EVIDENCE_BYTES:
        raise MalformedEvidence("the RA-TLS evidence is empty or too large")
    return platform, evidence


def certificate_expiry(cert_der: bytes) -> datetime:
    return _load(cert_der).not_valid_after_utc


def check_binding(cert_der: bytes, claims: Claims) -> None:
    """Raise unless ``claims`` (from the certificate's evidence) bind the certificate's key:
    `EvidenceSignatureInvalid` for a certificate whose self-signature does not verify,
    `NonceMismatch` for report data that is not the key's hash."""
    cert = _load(cert_der)
    try:
        key = cert.public_key()
        cert.verify_directly_issued_by(cert)
    except InvalidSignature:
        raise EvidenceSignatureInvalid("the RA-TLS certificate's self-signature does not verify") from None
    except CERT_ERRORS:
        raise MalformedEvidence("the RA-TLS certificate is not a self-signed EC certificate") from None
    try:
        report_data = bytes.fromhex(claims.report_data)
    except ValueError:
        raise NonceMismatch("the report data is not hex") from None
    if len(report_data) != REPORT_DATA_SIZE:
        raise NonceMismatch(f"the report data is {len(report_data)} bytes, expected {REPORT_DATA_SIZE}")
    if not hmac.compare_digest(report_data, report_data_for(_spki(key))):
        raise NonceMismatch("the evidence does not bind this certificate's key")


# ------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class _Verified:
    claims: Claims
    expires_at: datetime


class RatlsVerifier:
    """Decides whether a peer's RA-TLS certificate is acceptable under ``policy``.

    ``verifier_for(platform, evidence)`` answers the platform verifier that trusts the right
    roots (ValueError when there is none: the certificate is refused). ``measurement``: also
    require this measurement (a client that expects one exact build). The policy is evaluated
    with ``nonce_checked=False`` (the TLS binding proves who, not when), so its rules must not
    require a nonce. A verified certificate (by the SHA-256 of its DER) is cached until the
    earliest of its ``not_after``, its evidence chain's ``not_after`` and its evidence time
    plus the allowing rule's ``max_evidence_age``; at most ``cache_size`` entries (LRU)."""

    def __init__(
        self,
        policy: Policy,
        verifier_for: Callable[[str, bytes], PlatformVerifier],
        *,
        measurement: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        cache_size: int = 256,
    ) -> None:
        self.policy = policy
        self._verifier_for = verifier_for
        self._measurement = measurement.lower() if measurement else None
        self._clock = clock
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()
        self.verifications = 0
        """Certificates verified in full (a cache hit does not count)."""
        self.cache_hits = 0

    def verify(self, cert_der: bytes) -> Claims:
        """The claims of an acceptable certificate; a typed `AttestationError` otherwise."""
        now = self._clock()
        digest = hashlib.sha256(bytes(cert_der)).digest()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                if now < cached.expires_at:
                    self._cache.move_to_end(digest)
                    self.cache_hits += 1
                    return cached.claims
                del self._cache[digest]
            self.verifications += 1
        verified = self._verify(cert_der, now)
        if self._cache_size:
            with self._lock:
                self._cache[digest] = verified
                self._cache.move_to_end(digest)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return verified.claims

    def _verify(self, cert_der: bytes, now: datetime) -> _Verified:
        platform, evidence = evidence_from_certificate(cert_der)
        cert = _load(cert_der)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ChainInvalid(f"the RA-TLS certificate is not valid at {now.isoformat()}")
        try:
            verifier = self._verifier_for(platform, evidence)
        except ValueError as exc:
            raise ChainInvalid(f"no trusted {platform} verifier for this evidence: {exc}") from None
        expires_at = cert.not_valid_after_utc
        verify_chain = getattr(verifier, "verify_chain", None)
        verify_with_chain = getattr(verifier, "verify_with_chain", None)
        if callable(verify_chain) and callable(verify_with_chain):
            chain = verify_chain(evidence, now)
            chain_not_after = getattr(chain, "not_after", None)
            if isinstance(chain_not_after, datetime):
                expires_at = min(expires_at, chain_not_after)
            claims = verify_with_chain(evidence, chain, now)
        else:
            claims = verifier.verify(evidence, at=now)
        if claims.platform != platform:
            raise MalformedEvidence(f"the {platform} verifier returned claims for {claims.platform!r}")
        check_binding(cert_der, claims)
        decision = self.policy.evaluate(claims, now=now, nonce_checked=False)
        reasons = list(decision.reasons)
        if self._measurement is not None and claims.measurement.lower() != self._measurement:
            reasons.append(f"measurement {claims.measurement} is not the expected {self._measurement}")
        if not decision.allowed or reasons:
            raise PolicyDenied(reasons)
        assert decision.rule_index is not None  # typing: an allowed decision names its rule  # nosec B101
        max_age = self.policy.rules[decision.rule_index].max_evidence_age
        if max_age is not None and claims.evidence_time is not None:
            evidence_time = claims.evidence_time
            if evidence_time.tzinfo is None:
                evidence_time = evidence_time.replace(tzinfo=UTC)
            expires_at = min(expires_at, evidence_time + max_age)
        return _Verified(claims, expires_at)

    def try_verify(self, cert_der: bytes) -> tuple[Claims | None, str]:
        """(claims, "") or (None, a one-line reason): for a TLS verification callback."""
        try:
            return self.verify(cert_der), ""
        except AttestationError as exc:
            return None, f"{type(exc).__name__}: {exc}"
