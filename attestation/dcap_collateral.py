"""DCAP collateral for ``attestation.dcap``: dcap-qvl's collateral JSON, read and checked once when
a verifier is built, and the validity windows of everything in it.

The collateral is configuration, not evidence: what cannot be used is a ``ValueError`` when the
verifier is built. Its signatures are checked per appraisal: by dcap-qvl for TCB info v3, by
``attestation.dcap_appraisal_v2`` for SGX TCB info v2 (which dcap-qvl does not read).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from attestation.errors import ChainInvalid

__all__ = [
    "CERT_ERRORS",
    "COLLATERAL_KEYS",
    "DcapCollateral",
    "Window",
    "cert_window",
    "certificate_name",
    "check_windows",
    "parse_collateral",
]

#: Errors that reading a tampered or hostile certificate or CRL can raise in ``cryptography``.
CERT_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension, x509.InvalidVersion)

COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


@dataclass(frozen=True)
class Window:
    """When one thing the appraisal relies on is valid."""

    what: str
    not_before: datetime
    not_after: datetime


@dataclass(frozen=True)
class DcapCollateral:
    native: dcap_qvl.QuoteCollateralV3 | None  # None for TCB info v2, which dcap-qvl cannot read
    digest: bytes  # SHA-256 of the collateral JSON text
    fmspc: str  # the TCB info's FMSPC, lowercase hex
    windows: tuple[Window, ...]
    tcb_info_version: int  # 3, or 2 (SGX only)
    #: The collateral JSON's string fields (``COLLATERAL_KEYS``), read-only.
    fields: Mapping[str, str] = field(repr=False, compare=False)


def cert_window(cert: x509.Certificate, what: str) -> Window:
    return Window(what, cert.not_valid_before_utc, cert.not_valid_after_utc)


def certificate_name(cert: x509.Certificate) -> str:
    """The certificate's common name, for messages."""
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except CERT_ERRORS:
        return "a certificate"
    value = names[0].value if names else "a certificate"
    return value if isinstance(value, str) else "a certificate"


def check_windows(windows: tuple[Window, ...] | list[Window], at: datetime) -> None:
    """``ChainInvalid`` naming the first window ``at`` is outside of."""
    for window in windows:
        if at < window.not_before:
            raise ChainInvalid(
                f"{window.what} is not yet valid at {at.isoformat()} (from {window.not_before.isoformat()})"
            )
        if at > window.not_after:
            raise ChainInvalid(
                f"{window.what} expired at {window.not_after.isoformat()} (checked at {at.isoformat()})"
            )


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"the collateral's {what} is missing")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"the collateral's {what} is not an ISO time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _pem_certs(text: str, what: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(text.encode())
    except CERT_ERRORS:
        raise ValueError(f"the collateral's {what} is not a PEM certificate chain") from None


def _windows(data: dict[str, Any], tcb_info: dict[str, Any], qe_identity: dict[str, Any]) -> list[Window]:
    windows = [
        Window(
            "the TCB info",
            _time(tcb_info.get("issueDate"), "TCB info issueDate"),
            _time(tcb_info.get("nextUpdate"), "TCB info nextUpdate"),
        ),
        Window(
            "the QE identity",
            _time(qe_identity.get("issueDate"), "QE identity issueDate"),
            _time(qe_identity.get("nextUpdate"), "QE identity nextUpdate"),
        ),
    ]
    for key, what in (("root_ca_crl", "the Root CA CRL"), ("pck_crl", "the PCK CRL")):
        try:
            crl = x509.load_der_x509_crl(bytes.fromhex(data[key]))
            this_update, next_update = crl.last_update_utc, crl.next_update_utc
        except CERT_ERRORS:
            raise ValueError(f"the collateral's {key} is not a hex DER CRL") from None
        if next_update is None:
            raise ValueError(f"the collateral's {key} has no nextUpdate")
        windows.append(Window(what, this_update, next_update))
    for key in ("tcb_info_issuer_chain", "qe_identity_issuer_chain", "pck_crl_issuer_chain"):
        for cert in _pem_certs(data[key], key):
            try:
                window = cert_window(
                    cert, f"the certificate {certificate_name(cert)!r} of the collateral's {key}"
                )
            except CERT_ERRORS:
                raise ValueError(f"a certificate of the collateral's {key} cannot be read") from None
            windows.append(window)
    return windows


def parse_collateral(collateral: bytes | str, *, tcb_info_id: str, qe_identity_id: str) -> DcapCollateral:
    """Read dcap-qvl's collateral JSON (``QuoteCollateralV3.to_json``). ``tcb_info_id`` is "SGX" or
    "TDX", ``qe_identity_id`` "QE" or "TD_QE". The TCB info is version 3 (Intel PCS API v4), or for
    SGX version 2 (PCS API v3, which has no ``id``). Raises ``ValueError``."""
    try:
        text = collateral.decode() if isinstance(collateral, bytes) else collateral
        data = json.loads(text)
    except ValueError:  # UnicodeDecodeError too
        raise ValueError("the DCAP collateral is not JSON") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(key), str) for key in COLLATERAL_KEYS):
        raise ValueError("the DCAP collateral lacks one of: " + ", ".join(COLLATERAL_KEYS))
    try:
        tcb_info = json.loads(data["tcb_info"])
        qe_identity = json.loads(data["qe_identity"])
    except ValueError:
        raise ValueError("the DCAP collateral's tcb_info or qe_identity is not JSON") from None
    if not isinstance(tcb_info, dict) or not isinstance(qe_identity, dict):
        raise ValueError("the DCAP collateral's tcb_info and qe_identity must be JSON objects")
    version = tcb_info.get("version")
    v2 = tcb_info_id == "SGX" and version == 2 and tcb_info.get("id", "SGX") == "SGX"
    if not v2 and (version != 3 or tcb_info.get("id") != tcb_info_id):
        also = " or version 2 (PCS API v3)" if tcb_info_id == "SGX" else ""
        raise ValueError(
            f"the DCAP collateral's TCB info is {tcb_info.get('id')!r} version {version!r};"
            f" expected {tcb_info_id!r} version 3 (Intel PCS API v4){also}"
        )
    if qe_identity.get("id") != qe_identity_id:
        raise ValueError(
            f"the DCAP collateral's QE identity is {qe_identity.get('id')!r}, not {qe_identity_id!r}"
        )
    windows = _windows(data, tcb_info, qe_identity)
    native = None
    if not v2:
        try:
            native = dcap_qvl.QuoteCollateralV3.from_json(text)
        except Exception as exc:  # the extension raises ValueError; be sure nothing else escapes
            raise ValueError(
                f"dcap-qvl cannot read the collateral: {str(exc).splitlines()[0][:200]}"
            ) from None
    return DcapCollateral(
        native=native,
        digest=hashlib.sha256(text.encode()).digest(),
        fmspc=str(tcb_info.get("fmspc", "")).lower(),
        windows=tuple(windows),
        tcb_info_version=2 if v2 else 3,
        fields=MappingProxyType({key: data[key] for key in COLLATERAL_KEYS}),
    )
