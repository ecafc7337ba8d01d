"""X.509 checks the platform verifiers share: what reading a hostile certificate may raise, a
certificate's validity at a time, and a CA certificate's extensions; failures are one-line
``ChainInvalid`` naming the certificate."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from attestation.errors import ChainInvalid

__all__ = ["CERT_ERRORS", "ca_extensions", "check_validity"]

#: What ``cryptography`` raises reading a malformed certificate or one of its extensions.
CERT_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion)


def check_validity(cert: x509.Certificate, at: datetime, what: str) -> None:
    """``ChainInvalid`` unless ``at`` is inside the certificate's validity."""
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise ChainInvalid(
            f"the {what} is not valid at {at.isoformat()} (valid {cert.not_valid_before_utc.isoformat()}"
            f" to {cert.not_valid_after_utc.isoformat()})"
        )


def ca_extensions(cert: x509.Certificate, what: str) -> tuple[x509.BasicConstraints, x509.KeyUsage]:
    """The certificate's BasicConstraints and KeyUsage; ``ChainInvalid`` if either is missing or
    unreadable."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ChainInvalid(f"the {what} lacks BasicConstraints or KeyUsage") from None
    except CERT_ERRORS:
        raise ChainInvalid(f"the {what}'s extensions cannot be read") from None
    return constraints, usage
