"""The DCAP appraisal of an SGX quote against collateral whose TCB info is version 2 (Intel PCS
API v3), done here with ``cryptography`` alone.

Why not dcap-qvl: dcap-qvl 0.7 (the newest) reads only TCB info v3; v2 TCB info has no
``sgxtcbcomponents`` list (its components are the flat ``sgxtcbcompNNsvn`` keys), and dcap-qvl
refuses it ("missing field sgxtcbcomponents"). Intel PCS API v3 serves v2, and collateral kept
from it (as the dcap-rs sample of vectors/sgx) is v2, so ``attestation.dcap.SgxDcapVerifier``
hands v2 collateral to ``appraise`` and keeps dcap-qvl for v3.

``appraise`` checks, in this order, and raises a one-line typed error for the first failure:

1. the PCK chain: the leaf ("Intel SGX PCK Certificate") is signed by the PCK Platform or
   Processor CA, and that CA (a CA certificate) by the trusted root (the verifier's, by default
   the pinned Intel SGX Root CA);
2. the collateral's issuer chains: the TCB info's and the QE identity's are each their signer
   and the trusted root, the PCK CRL's is the quote's PCK CA and the trusted root; the CRLs: the
   Root CA CRL is signed by the root, the PCK CRL by the quote's PCK CA; the root CRL does not
   list the PCK CA nor the TCB signing certificates, the PCK CRL not the leaf;
3. the PCK leaf's Intel SGX extension (OID 1.2.840.113741.1.13.1), read by the small DER reader
   of ``attestation.dcap_pck_extension``: TCB (.2: component SVNs .2.1-.2.16, PCESVN .2.17,
   CPUSVN .2.18), PCE-ID (.3) and FMSPC (.4); FMSPC and PCE-ID must be the TCB info's;
4. the QE report's signature by the PCK leaf key, and QE report data = SHA-256(attestation key ||
   QE auth data) (its first 32 bytes);
5. the TCB info and the QE identity: each is ECDSA P-256 (raw r||s) over its exact JSON text,
   by the first certificate of its issuer chain, which must be the "Intel SGX TCB Signing"
   certificate issued by the trusted root;
6. the TCB level: the first of ``tcbLevels`` whose every ``sgxtcbcompNNsvn`` is at most the PCK's
   component SVN and whose ``pcesvn`` is at most the PCK's PCESVN gives the platform status;
7. the QE identity ("QE", version 2): the QE report's MRSIGNER and ISVPRODID are the identity's,
   its MISCSELECT and ATTRIBUTES under the masks equal the identity's values, and the first
   ``tcbLevels`` entry whose ``isvsvn`` is at most the QE's ISVSVN gives the QE status;
8. the result: the platform status combined with the QE status as Intel's QVL
   (``convergeTcbStatus``) does: a QE OutOfDate makes UpToDate and SWHardeningNeeded OutOfDate,
   and ConfigurationNeeded and ConfigurationAndSWHardeningNeeded OutOfDateConfigurationNeeded; a
   QE Revoked makes the result Revoked. TCB info v2 carries no advisories.

The quote signature, the canonical PEM of the PCK chain, the quote's root being the trusted root
and every validity window (each certificate, both CRLs, the TCB info and the QE identity at
``at``) are checked by ``attestation.dcap`` before ``appraise`` runs, for v2 and v3 alike.

Failures are ``ChainInvalid`` (the chain, the collateral, the QE): the verifier core may share a
chain verdict among the quotes of one platform, and none of these depends on the enclave report.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.dcap_collateral import CERT_ERRORS, certificate_name
from attestation.dcap_pck_extension import SgxExtension, parse_sgx_extension
from attestation.dcap_quote import Quote, parse_sgx_report
from attestation.errors import ChainInvalid, MalformedEvidence
from attestation.policy import TCB_STATUSES

__all__ = ["Appraisal", "V2Collateral", "appraise", "load_collateral"]

_COMPONENTS = 16
_PCK_CA_NAMES = ("Intel SGX PCK Platform CA", "Intel SGX PCK Processor CA")
_PCK_LEAF_NAME = "Intel SGX PCK Certificate"
_TCB_SIGNING_NAME = "Intel SGX TCB Signing"
_QE_STATUSES = ("UpToDate", "OutOfDate", "Revoked")


@dataclass(frozen=True)
class V2Collateral:
    """The parts of v2 collateral ``appraise`` uses, read once when the verifier is built."""

    tcb_info_text: bytes
    tcb_info_signature: bytes
    tcb_info_chain: tuple[x509.Certificate, ...]  # the TCB Signing certificate, the root
    qe_identity_text: bytes
    qe_identity_signature: bytes
    qe_identity_chain: tuple[x509.Certificate, ...]  # likewise
    pck_crl_chain: tuple[x509.Certificate, ...]  # the PCK CA, the root
    root_crl: x509.CertificateRevocationList
    pck_crl: x509.CertificateRevocationList


@dataclass(frozen=True)
class Appraisal:
    fmspc: str  # lowercase hex
    tcb_status: str  # one of ``policy.TCB_STATUSES``: the platform's and the QE's combined
    advisories: tuple[str, ...]
    platform_status: str  # the matching TCB level's
    tcb_date: str  # the matching TCB level's tcbDate, as the TCB info gives it
    qe_status: str  # the QE identity's matching level's


# -- collateral ----------------------------------------------------------------------------------


def load_collateral(fields: Mapping[str, str]) -> V2Collateral:
    """The v2 collateral's parts, from the collateral JSON's string fields (``COLLATERAL_KEYS``).
    Raises ``ValueError`` for what cannot be read; nothing is trusted until ``appraise``."""

    def signature(key: str) -> bytes:
        try:
            return bytes.fromhex(fields[key])
        except ValueError:
            raise ValueError(f"the collateral's {key} is not hex") from None

    def chain(key: str) -> tuple[x509.Certificate, ...]:
        try:
            return tuple(x509.load_pem_x509_certificates(fields[key].encode()))
        except CERT_ERRORS:
            raise ValueError(f"the collateral's {key} is not a PEM certificate chain") from None

    def crl(key: str) -> x509.CertificateRevocationList:
        try:
            return x509.load_der_x509_crl(bytes.fromhex(fields[key]))
        except CERT_ERRORS:
            raise ValueError(f"the collateral's {key} is not a hex DER CRL") from None

    return V2Collateral(
        tcb_info_text=fields["tcb_info"].encode(),
        tcb_info_signature=signature("tcb_info_signature"),
        tcb_info_chain=chain("tcb_info_issuer_chain"),
        qe_identity_text=fields["qe_identity"].encode(),
        qe_identity_signature=signature("qe_identity_signature"),
        qe_identity_chain=chain("qe_identity_issuer_chain"),
        pck_crl_chain=chain("pck_crl_issuer_chain"),
        root_crl=crl("root_ca_crl"),
        pck_crl=crl("pck_crl"),
    )


# -- the appraisal -------------------------------------------------------------------------------


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (*CERT_ERRORS, InvalidSignature):
        raise ChainInvalid(f"{what} is not signed by {certificate_name(issuer)!r}") from None


def _named(cert: x509.Certificate, names: Sequence[str], what: str) -> None:
    if certificate_name(cert) not in names:
        raise ChainInvalid(f"{what} is {certificate_name(cert)[:80]!r}, not {' or '.join(names)}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, *CERT_ERRORS):
        return False


def _check_issuer_chain(
    chain: Sequence[x509.Certificate], first: x509.Certificate | None, root: x509.Certificate, what: str
) -> x509.Certificate:
    """The collateral's issuer chain ``what`` is two certificates, the second the trusted root
    (and the first ``first``, when given); returns the first."""
    ders = [cert.public_bytes(Encoding.DER) for cert in chain]
    expected = [
        first.public_bytes(Encoding.DER) if first is not None else None,
        root.public_bytes(Encoding.DER),
    ]
    if len(ders) != 2 or any(
        want is not None and not hmac.compare_digest(got, want)
        for got, want in zip(ders, expected, strict=True)
    ):
        ending = (
            "the quote's PCK CA and the trusted root"
            if first is not None
            else "a signer and the trusted root"
        )
        raise ChainInvalid(f"the collateral's {what} is not {ending}")
    return chain[0]


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, what: str) -> None:
    try:
        key = issuer.public_key()
        valid = (
            isinstance(key, ec.EllipticCurvePublicKey)
            and crl.issuer == issuer.subject
            and crl.is_signature_valid(key)
        )
    except (*CERT_ERRORS, InvalidSignature):
        valid = False
    if not valid:
        raise ChainInvalid(f"{what} is not signed by {certificate_name(issuer)!r}")


def _not_revoked(crl: x509.CertificateRevocationList, cert: x509.Certificate, what: str) -> None:
    try:
        revoked = crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    except CERT_ERRORS:
        raise ChainInvalid(f"the CRL that covers {what} cannot be read") from None
    if revoked:
        raise ChainInvalid(f"{what} is revoked")


def _ecdsa(key: object, signature: bytes, data: bytes, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        raise ChainInvalid(f"{what} does not verify")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise ChainInvalid(f"{what} does not verify") from None


def _signed_json(
    text: bytes, signature: bytes, signer: x509.Certificate, root: x509.Certificate, what: str
) -> dict[str, Any]:
    """The JSON object of ``text`` once its signature by the TCB Signing certificate verifies."""
    _named(signer, (_TCB_SIGNING_NAME,), f"the signer of the {what}")
    _issued_by(signer, root, f"the {what}'s signing certificate")
    _ecdsa(signer.public_key(), signature, text, f"the {what} signature")
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ChainInvalid(f"the {what} is not a JSON object")
    return document


def _field(document: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = document.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ChainInvalid(f"the {what}'s {key} is missing or not a {kind.__name__}")
    return value


def _hex_field(document: Mapping[str, Any], key: str, size: int, what: str) -> bytes:
    text = _field(document, key, str, what)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != size:
        raise ChainInvalid(f"the {what}'s {key} is not {size} bytes of hex")
    return value


def _levels(document: Mapping[str, Any], what: str) -> list[tuple[Mapping[str, Any], str, str]]:
    """Each TCB level's ``tcb``, ``tcbStatus`` and ``tcbDate``."""
    levels = _field(document, "tcbLevels", list, what)
    out: list[tuple[Mapping[str, Any], str, str]] = []
    for level in levels:
        if not isinstance(level, dict):
            raise ChainInvalid(f"a TCB level of the {what} is not an object")
        out.append(
            (
                _field(level, "tcb", dict, f"{what} TCB level"),
                _field(level, "tcbStatus", str, f"{what} TCB level"),
                _field(level, "tcbDate", str, f"{what} TCB level"),
            )
        )
    return out


def _platform_status(tcb_info: Mapping[str, Any], pck: SgxExtension) -> tuple[str, str]:
    what = "TCB info"
    if _field(tcb_info, "tcbType", int, what) != 0:
        raise ChainInvalid("the TCB info's tcbType is not 0 (SGX TCB components)")
    for tcb, status, date in _levels(tcb_info, what):
        comps = [_field(tcb, f"sgxtcbcomp{n:02d}svn", int, "TCB level") for n in range(1, _COMPONENTS + 1)]
        pcesvn = _field(tcb, "pcesvn", int, "TCB level")
        if all(c <= own for c, own in zip(comps, pck.comp_svns, strict=True)) and pcesvn <= pck.pce_svn:
            if status not in TCB_STATUSES:
                raise ChainInvalid(f"the TCB info's level has an unknown tcbStatus {status[:40]!r}")
            return status, date
    raise ChainInvalid("no TCB level of the collateral matches the platform (TCB level not supported)")


def _qe_status(identity: Mapping[str, Any], qe_report: bytes) -> str:
    what = "QE identity"
    if identity.get("id") != "QE" or identity.get("version") != 2:
        raise ChainInvalid("the QE identity is not enclaveIdentity 'QE' version 2")
    try:
        report = parse_sgx_report(qe_report)
    except MalformedEvidence:
        raise ChainInvalid("the QE report cannot be read") from None
    if not hmac.compare_digest(report.mr_signer, _hex_field(identity, "mrsigner", 32, what)):
        raise ChainInvalid("the QE's MRSIGNER is not the QE identity's")
    if report.isv_prod_id != _field(identity, "isvprodid", int, what):
        raise ChainInvalid("the QE's ISVPRODID is not the QE identity's")
    misc = report.misc_select.to_bytes(4, "little")
    for own, key in ((misc, "miscselect"), (report.attributes, "attributes")):
        mask = _hex_field(identity, f"{key}Mask", len(own), what)
        expected = _hex_field(identity, key, len(own), what)
        if bytes(a & b for a, b in zip(own, mask, strict=True)) != expected:
            raise ChainInvalid(f"the QE's {key.upper()} under the QE identity's mask is not its value")
    for tcb, status, _date in _levels(identity, what):
        if _field(tcb, "isvsvn", int, "QE identity TCB level") <= report.isv_svn:
            if status not in _QE_STATUSES:
                raise ChainInvalid(f"the QE identity's level has an unknown tcbStatus {status[:40]!r}")
            return status
    raise ChainInvalid(f"the QE's ISVSVN {report.isv_svn} is below every TCB level of the QE identity")


def _converged(platform: str, qe: str) -> str:
    """Intel QVL's ``convergeTcbStatus``."""
    if qe == "Revoked":
        return "Revoked"
    if qe == "OutOfDate":
        if platform in ("UpToDate", "SWHardeningNeeded"):
            return "OutOfDate"
        if platform in ("ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"):
            return "OutOfDateConfigurationNeeded"
    return platform


def appraise(
    quote: Quote, pck_chain: Sequence[x509.Certificate], root: x509.Certificate, collateral: V2Collateral
) -> Appraisal:
    """The DCAP appraisal of ``quote`` (its PCK chain: leaf, CA, root) against v2 collateral and
    the trusted ``root``. Raises ``ChainInvalid``."""
    leaf, ca = pck_chain[0], pck_chain[1]
    _named(ca, _PCK_CA_NAMES, "the PCK CA certificate")
    if not _is_ca(ca):
        raise ChainInvalid("the PCK CA certificate is not a CA certificate")
    _issued_by(ca, root, "the PCK CA certificate")
    _named(leaf, (_PCK_LEAF_NAME,), "the PCK leaf certificate")
    _issued_by(leaf, ca, "the PCK leaf certificate")

    tcb_signer = _check_issuer_chain(collateral.tcb_info_chain, None, root, "TCB info issuer chain")
    qe_signer = _check_issuer_chain(collateral.qe_identity_chain, None, root, "QE identity issuer chain")
    _check_issuer_chain(collateral.pck_crl_chain, ca, root, "PCK CRL issuer chain")
    _check_crl(collateral.root_crl, root, "the Root CA CRL")
    _check_crl(collateral.pck_crl, ca, "the PCK CRL")
    _not_revoked(collateral.root_crl, ca, "the PCK CA certificate")
    _not_revoked(collateral.pck_crl, leaf, "the PCK leaf certificate")
    _not_revoked(collateral.root_crl, tcb_signer, "the TCB info's signing certificate")
    _not_revoked(collateral.root_crl, qe_signer, "the QE identity's signing certificate")

    pck = parse_sgx_extension(leaf)
    _ecdsa(leaf.public_key(), quote.qe_report_signature, quote.qe_report, "the QE report signature")
    bound = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest()
    if not hmac.compare_digest(quote.qe_report[320:352], bound):
        raise ChainInvalid("the QE report data is not SHA-256(attestation key || QE auth data)")

    tcb_info = _signed_json(
        collateral.tcb_info_text, collateral.tcb_info_signature, tcb_signer, root, "TCB info"
    )
    if tcb_info.get("version") != 2:
        raise ChainInvalid("the signed TCB info is not version 2")
    fmspc = _hex_field(tcb_info, "fmspc", 6, "TCB info")
    if fmspc != pck.fmspc:
        raise ChainInvalid(
            f"the quote's platform FMSPC {pck.fmspc.hex()} is not the collateral's {fmspc.hex()}"
        )
    if _hex_field(tcb_info, "pceId", 2, "TCB info") != pck.pce_id:
        raise ChainInvalid(f"the quote's PCE-ID {pck.pce_id.hex()} is not the TCB info's")
    platform, tcb_date = _platform_status(tcb_info, pck)

    identity = _signed_json(
        collateral.qe_identity_text,
        collateral.qe_identity_signature,
        qe_signer,
        root,
        "QE identity",
    )
    qe = _qe_status(identity, quote.qe_report)
    return Appraisal(
        fmspc=pck.fmspc.hex(),
        tcb_status=_converged(platform, qe),
        advisories=(),
        platform_status=platform,
        tcb_date=tcb_date,
        qe_status=qe,
    )
