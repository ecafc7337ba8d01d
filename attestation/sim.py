"""Verifier for ``sim`` evidence (the simulated TEE of ``sealing.tee.sim``).

The format is specified byte by byte in docs/sim-evidence-format.md. This module does not
import the simulator: like a real verifier, it knows the format and trusts one root CA.

Checks, in order: structure (``MalformedEvidence``), the platform certificate's chain to the
configured root at time ``at`` (``ChainInvalid``), the evidence signature with the platform
key (``EvidenceSignatureInvalid``), then the signed fields' values (``MalformedEvidence``).
The signature is checked before the fields are interpreted, so any change to a signed byte
is reported as a bad signature rather than as whatever the changed byte happens to mean.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.claims import Claims
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence

MAGIC = b"RKSE"
VERSION = 1
# magic, version, reserved, measurement, signer, product id, svn, cpu svn, attributes,
# report data, timestamp (ms since epoch)
_SIGNED = struct.Struct(">4sHH32s32sHH16s16s64sQ")
_U16 = struct.Struct(">H")
MIN_EVIDENCE_BYTES = _SIGNED.size + 2 + 2  # signed part, two length prefixes (empty fields refused)
MAX_SIGNATURE_BYTES = 256  # DER ECDSA: 72 for P-256; larger ones reach the key check and fail there
MIN_SIGNATURE_BYTES = 8
ATTRIBUTE_DEBUG = 0x02  # attributes byte 0, bit 1 (SGX ATTRIBUTES.DEBUG)

# Errors raised while reading a certificate that a tampered or hostile DER can provoke.
_CERT_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion)


class _Evidence(NamedTuple):
    signed: bytes
    measurement: bytes
    signer: bytes
    product_id: int
    svn: int
    cpu_svn: bytes
    attributes: bytes
    report_data: bytes
    millis: int
    signature: bytes
    cert_der: bytes


def _split(evidence: bytes) -> _Evidence:
    """Structure only: sizes, magic, version. Raises ``MalformedEvidence``."""
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence("sim evidence must be bytes")
    data = bytes(evidence)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise MalformedEvidence("not sim evidence (bad magic)")
    if len(data) < MIN_EVIDENCE_BYTES:
        raise MalformedEvidence(
            f"sim evidence is truncated: {len(data)} bytes, at least {MIN_EVIDENCE_BYTES}"
        )
    (_, version, reserved, measurement, signer, product_id, svn, cpu_svn, attributes, report_data, millis) = (
        _SIGNED.unpack_from(data)
    )
    if version != VERSION:
        raise MalformedEvidence(f"sim evidence version {version} is not supported (this build reads 1)")
    if reserved != 0:
        raise MalformedEvidence("sim evidence reserved header bytes are not zero")
    pos = _SIGNED.size
    (sig_len,) = _U16.unpack_from(data, pos)
    pos += _U16.size
    if not MIN_SIGNATURE_BYTES <= sig_len <= MAX_SIGNATURE_BYTES:
        raise MalformedEvidence(f"sim evidence signature length {sig_len} is not an ECDSA signature")
    if pos + sig_len + _U16.size > len(data):
        raise MalformedEvidence("sim evidence is truncated in its signature")
    signature = data[pos : pos + sig_len]
    pos += sig_len
    (cert_len,) = _U16.unpack_from(data, pos)
    pos += _U16.size
    if cert_len == 0:
        raise MalformedEvidence("sim evidence has no platform certificate")
    if pos + cert_len > len(data):
        raise MalformedEvidence("sim evidence is truncated in its platform certificate")
    if pos + cert_len != len(data):
        raise MalformedEvidence(f"sim evidence has {len(data) - pos - cert_len} unexpected trailing bytes")
    return _Evidence(
        data[: _SIGNED.size],
        measurement,
        signer,
        product_id,
        svn,
        cpu_svn,
        attributes,
        report_data,
        millis,
        signature,
        data[pos:],
    )


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _check_validity(cert: x509.Certificate, at: datetime, what: str) -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ChainInvalid(
            f"{what} is not valid at {at.isoformat()} (valid {cert.not_valid_before_utc.isoformat()}"
            f" to {cert.not_valid_after_utc.isoformat()})"
        )


@dataclass(frozen=True)
class VerifiedChain:
    """A platform certificate that chains to the trusted root; valid until ``not_after``."""

    cert_der: bytes
    key: ec.EllipticCurvePublicKey
    not_after: datetime


class SimVerifier:
    """``PlatformVerifier`` for platform ``sim``, trusting one sim root CA (``SimHost.root_ca_pem``)."""

    platform: str = "sim"
    #: ``verify_with_chain`` is one ECDSA P-256 check of the 180 signed bytes (about 60 us) and a
    #: SHA-256 of the evidence (at most 64 KiB): cheaper on the core's event loop than in a thread.
    verify_with_chain_inline: bool = True

    def __init__(self, root_ca_pem: bytes) -> None:
        try:
            root = x509.load_pem_x509_certificate(root_ca_pem)
            constraints = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
            root.verify_directly_issued_by(root)
        except (*_CERT_ERRORS, InvalidSignature, x509.ExtensionNotFound):
            raise ValueError("root_ca_pem is not a self-signed CA certificate") from None
        if not constraints.ca or not usage.key_cert_sign:
            raise ValueError("root_ca_pem is not a CA certificate (CA:true, keyCertSign)")
        self._root = root

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        return self.verify_with_chain(evidence, self.verify_chain(evidence, at), at)

    def verify_chain(self, evidence: bytes, at: datetime) -> VerifiedChain:
        """Check the platform certificate against the root: the part every enclave on one host
        shares, which the verifier core caches per ``chain_cache_key`` during a storm."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        parsed = _split(evidence)
        try:
            cert = x509.load_der_x509_certificate(parsed.cert_der)
        except _CERT_ERRORS:
            raise MalformedEvidence("sim evidence platform certificate is not DER X.509") from None
        # The signature BIT STRING ends the certificate. The parser accepts a non-zero count of
        # unused bits when those bits are zero, so one certificate would have several encodings
        # that all verify: accept only the one with whole bytes, as the issuer wrote it.
        if parsed.cert_der[-len(cert.signature) - 1] != 0:
            raise ChainInvalid("the platform certificate's signature is not a whole number of bytes")
        key = self._check_chain(cert, at)
        not_after = min(cert.not_valid_after_utc, self._root.not_valid_after_utc)
        return VerifiedChain(parsed.cert_der, key, not_after)

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        """Verify the evidence signature with an already verified chain."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        parsed = _split(evidence)
        if not isinstance(chain, VerifiedChain) or not hmac.compare_digest(chain.cert_der, parsed.cert_der):
            raise ChainInvalid("sim evidence carries another platform certificate than the verified chain")
        if at > chain.not_after:
            raise ChainInvalid(f"the platform certificate chain expired at {chain.not_after.isoformat()}")
        try:
            chain.key.verify(parsed.signature, parsed.signed, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise EvidenceSignatureInvalid(
                "sim evidence signature does not verify with its platform attestation key"
            ) from None
        # The fields below are signed: interpret them only now.
        if parsed.attributes[0] & ~ATTRIBUTE_DEBUG or any(parsed.attributes[1:]):
            raise MalformedEvidence("sim evidence attributes have bits other than DEBUG set")
        try:
            evidence_time = datetime.fromtimestamp(parsed.millis / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            raise MalformedEvidence("sim evidence timestamp is out of range") from None
        return Claims(
            platform=self.platform,
            measurement=parsed.measurement.hex(),
            signer=parsed.signer.hex(),
            product_id=parsed.product_id,
            svn=parsed.svn,
            debug=bool(parsed.attributes[0] & ATTRIBUTE_DEBUG),
            tcb_status="UpToDate",
            report_data=parsed.report_data.hex(),
            evidence_digest=hashlib.sha256(evidence).hexdigest(),
            evidence_time=evidence_time,
            cpu_svn=parsed.cpu_svn.hex(),
        )

    def chain_cache_key(self, evidence: bytes) -> bytes:
        """The platform certificate's DER: every enclave on one sim host shares it."""
        return _split(evidence).cert_der

    def _check_chain(self, cert: x509.Certificate, at: datetime) -> ec.EllipticCurvePublicKey:
        """Platform certificate -> configured root, at ``at``; returns the platform key."""
        _check_validity(self._root, at, "the sim root CA")
        try:
            cert.verify_directly_issued_by(self._root)
        except (*_CERT_ERRORS, InvalidSignature):
            raise ChainInvalid(
                "the platform certificate is not issued by the configured sim root CA"
            ) from None
        try:
            _check_validity(cert, at, "the platform certificate")
            extensions = cert.extensions
            constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
            usage = extensions.get_extension_for_class(x509.KeyUsage).value
            key = cert.public_key()
        except x509.ExtensionNotFound:
            raise ChainInvalid("the platform certificate lacks BasicConstraints or KeyUsage") from None
        except _CERT_ERRORS:
            raise ChainInvalid("the platform certificate cannot be read") from None
        if constraints.ca:
            raise ChainInvalid("the platform certificate is a CA certificate, not an attestation key")
        if not usage.digital_signature:
            raise ChainInvalid("the platform certificate's key usage does not allow digital signatures")
        if not isinstance(key, ec.EllipticCurvePublicKey) or not _is_p256(key):
            raise ChainInvalid("the platform attestation key is not an ECDSA P-256 key")
        return key
