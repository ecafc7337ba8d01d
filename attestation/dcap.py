"""Verifiers for Intel DCAP ECDSA quotes: SGX (quote v3, platform ``sgx``) and TDX (quote v4 and
v5, platform ``tdx``).

The cryptographic appraisal against TCB info v3 collateral is the PyPI ``dcap-qvl`` library's
(the Rust Phala-Network/dcap-qvl crate): QE report signature with the PCK leaf, QE report data =
SHA-256(attestation key || QE auth data), the PCK chain to the Intel SGX Root CA, the CRLs, the
TCB-info and QE-identity signatures and the TCB status with its advisories. dcap-qvl does not read
TCB info v2 (Intel PCS API v3), still what many SGX platforms' collateral is: for SGX collateral
of version 2 the same appraisal is ``attestation.dcap_appraisal_v2`` (``cryptography`` only),
with the same ``DcapChain`` and the same one-check ``verify_with_chain``. The quote structure is
read by ``attestation.dcap_quote``. On top of the appraisal this module

* pins the Intel SGX Root CA (``attestation/roots/intel_sgx_root_ca.der``, checked against
  ``INTEL_SGX_ROOT_CA_SHA256``) and hands it to dcap-qvl explicitly; dcap-qvl 0.7 embeds the same
  certificate (byte-identical: its ``src/TrustedRootCA.der`` is inside the extension module), but
  the pin here does not depend on that;
* checks that ``at`` lies inside every validity window the verification relied on (TCB info and
  QE identity ``issueDate``/``nextUpdate``, both CRLs' ``thisUpdate``/``nextUpdate``, every
  certificate of the collateral and of the quote's PCK chain) and names the first one it is not;
* accepts only the canonical PEM of the PCK chain (the DER of each certificate, base64 in 64
  column lines, optionally NUL-terminated), so one chain has one encoding and one cache key;
* checks the quote signature itself (``cryptography``) and maps every failure to a typed error.

Caching (``CachingPlatformVerifier``): ``verify_chain`` runs the whole appraisal once per platform
chain; ``verify_with_chain`` is then one ECDSA P-256 check of the quote signature with the chain's
attestation key. ``chain_cache_key`` covers every byte the appraisal relied on except the
enclave/TD report and its signature: the quote header, the attestation key, the QE report and
its signature, the QE auth data, the PCK chain and the collateral's digest, and for TDX also the
TD report fields the TCB appraisal reads (TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAM_ATTRIBUTES and,
in a TD 1.5 body, TEE_TCB_SVN2 and MRSERVICETD): those are per platform and TDX module, not per TD.

Claims. SGX: measurement MRENCLAVE, signer MRSIGNER, product_id ISVPRODID, svn ISVSVN, debug
ATTRIBUTES.DEBUG, cpu_svn CPUSVN. TDX has no enclave signer nor a TD version number:
measurement is MRTD; signer is MROWNER (the TD owner's software-defined identity, the closest
thing to SGX's MRSIGNER: it is what a host operator cannot choose for the owner); product_id and
svn are 0 (a TD carries no product or security version; the platform's TEE_TCB_SVN is in
``cpu_svn``, as SGX's CPUSVN is, and is appraised in ``tcb_status``); debug is TD attributes
bit 0 (TUD.DEBUG). The other fields are in ``details``. Quotes carry no time: ``evidence_time``
is None. ``evidence_digest`` is the SHA-256 of the evidence as given.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import ClassVar

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import dcap_appraisal_v2
from attestation.claims import Claims
from attestation.dcap_collateral import (
    CERT_ERRORS,
    cert_window,
    certificate_name,
    check_windows,
    parse_collateral,
)
from attestation.dcap_quote import (
    ATTESTATION_KEY_ECDSA_P256,
    BODY_SGX,
    BODY_TD15,
    INTEL_QE_VENDOR_ID,
    TD10_SIZE,
    TEE_SGX,
    TEE_TDX,
    Quote,
    SgxReport,
    TdReport,
    parse_quote,
)
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence
from attestation.policy import TCB_STATUSES

__all__ = [
    "INTEL_SGX_ROOT_CA_SHA256",
    "DcapChain",
    "SgxDcapVerifier",
    "TdxVerifier",
    "intel_sgx_root_ca_der",
]

#: SHA-256 of the DER of the Intel SGX Root CA (CN=Intel SGX Root CA, 2018-05-21 -> 2049-12-31).
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

_PCK_CHAIN_LENGTH = 3  # PCK leaf, PCK Platform or Processor CA, Root CA
#: dcap-qvl's status names (and the older spellings) -> the names of ``policy.TCB_STATUSES``.
_STATUS_NAMES = {
    **{name: name for name in TCB_STATUSES},
    "OK": "UpToDate",
    "SW_HARDENING_NEEDED": "SWHardeningNeeded",
    "CONFIGURATION_NEEDED": "ConfigurationNeeded",
    "CONFIGURATION_AND_SW_HARDENING_NEEDED": "ConfigurationAndSWHardeningNeeded",
    "OUT_OF_DATE": "OutOfDate",
    "OUT_OF_DATE_CONFIGURATION_NEEDED": "OutOfDateConfigurationNeeded",
    "REVOKED": "Revoked",
}
# dcap-qvl error texts (first line, after "Verification failed: ") that are about the quote's
# structure or its own signature rather than the chain or the collateral.
_MALFORMED_HINTS = ("decode quote", "extract pck", "parse pck", "unknown qe vendor", "unsupported")
_SIGNATURE_HINTS = ("isv enclave report signature", "td report signature")


def intel_sgx_root_ca_der() -> bytes:
    """The packaged Intel SGX Root CA (DER), checked against ``INTEL_SGX_ROOT_CA_SHA256``."""
    der = resources.files("attestation").joinpath("roots/intel_sgx_root_ca.der").read_bytes()
    if hashlib.sha256(der).hexdigest() != INTEL_SGX_ROOT_CA_SHA256:
        raise RuntimeError("the packaged Intel SGX Root CA does not match its pinned SHA-256")
    return der


@dataclass(frozen=True)
class DcapChain:
    """The verified part of a quote that its platform shares: what ``verify_chain`` returns."""

    platform: str
    key_digest: bytes  # SHA-256 of ``chain_cache_key`` of the evidence it was verified for
    attestation_key: bytes  # raw x||y
    public_key: ec.EllipticCurvePublicKey
    tcb_status: str
    advisories: tuple[str, ...]
    fmspc: str
    not_before: datetime
    not_after: datetime


def _pck_chain(quote: Quote) -> list[x509.Certificate]:
    """The quote's PCK chain, in its one accepted encoding."""
    pem = quote.cert_data[:-1] if quote.cert_data.endswith(b"\0") else quote.cert_data
    try:
        certs = x509.load_pem_x509_certificates(pem)
        canonical = b"".join(cert.public_bytes(Encoding.PEM) for cert in certs)
        ders = [cert.public_bytes(Encoding.DER) for cert in certs]
        signatures = [cert.signature for cert in certs]
    except CERT_ERRORS:
        raise MalformedEvidence("the DCAP quote's PCK chain is not PEM X.509") from None
    if len(certs) != _PCK_CHAIN_LENGTH:
        raise MalformedEvidence(f"the DCAP quote's PCK chain has {len(certs)} certificates, expected 3")
    if not hmac.compare_digest(canonical, pem):
        raise MalformedEvidence("the DCAP quote's PCK chain is not in canonical PEM")
    # The signature BIT STRING ends a certificate; accept only zero unused bits, so a certificate
    # has one encoding (the parser tolerates a non-zero count when those bits are zero).
    for der, signature in zip(ders, signatures, strict=True):
        if len(der) <= len(signature) or der[-len(signature) - 1] != 0:
            raise MalformedEvidence("a PCK certificate's signature is not a whole number of bytes")
    return certs


def _attestation_key(raw: bytes) -> ec.EllipticCurvePublicKey:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        raise EvidenceSignatureInvalid("the DCAP quote's attestation key is not a P-256 point") from None


def _check_quote_signature(quote: Quote, key: ec.EllipticCurvePublicKey) -> None:
    r = int.from_bytes(quote.signature[:32], "big")
    s = int.from_bytes(quote.signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), quote.signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise EvidenceSignatureInvalid(
            "the DCAP quote signature does not verify with its attestation key"
        ) from None


def _native_error(exc: BaseException) -> MalformedEvidence | EvidenceSignatureInvalid | ChainInvalid:
    """A typed, one-line error for a dcap-qvl failure (its texts name no secret)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.removeprefix("Verification failed:").strip()[:200]
    lowered = text.lower()
    if "no matching tcb level" in lowered:
        return ChainInvalid("no TCB level of the collateral matches the platform (TCB level not supported)")
    if any(hint in lowered for hint in _SIGNATURE_HINTS):
        return EvidenceSignatureInvalid(f"DCAP quote signature invalid: {text}")
    if any(hint in lowered for hint in _MALFORMED_HINTS):
        return MalformedEvidence(f"DCAP quote rejected: {text}")
    return ChainInvalid(f"DCAP appraisal failed: {text}")


class _DcapVerifier:
    """The common part of the SGX and TDX verifiers (``PlatformVerifier`` and
    ``CachingPlatformVerifier``)."""

    platform: str
    _tee_type: ClassVar[int]
    _versions: ClassVar[tuple[int, ...]]
    _tcb_info_id: ClassVar[str]
    _qe_identity_id: ClassVar[str]
    #: ``verify_with_chain`` is a parse, a SHA-256 of about 5 KiB and one ECDSA P-256 check.
    verify_with_chain_inline: ClassVar[bool] = True

    def __init__(self, collateral: bytes | str, *, root_ca_der: bytes | None = None) -> None:
        """``collateral``: dcap-qvl's collateral JSON (``QuoteCollateralV3.to_json``: TCB info, QE
        identity, their signatures and issuer chains, the Root CA and PCK CRLs, hex DER); for SGX
        the TCB info may be version 2 (appraised by ``attestation.dcap_appraisal_v2``).
        ``root_ca_der``: the trusted root (default: the pinned Intel SGX Root CA). Raises
        ``ValueError`` for collateral or a root that cannot be used."""
        self._collateral = parse_collateral(
            collateral, tcb_info_id=self._tcb_info_id, qe_identity_id=self._qe_identity_id
        )
        der = intel_sgx_root_ca_der() if root_ca_der is None else bytes(root_ca_der)
        try:
            root = x509.load_der_x509_certificate(der)
            root.verify_directly_issued_by(root)
        except (*CERT_ERRORS, InvalidSignature):
            raise ValueError("root_ca_der is not a self-signed certificate") from None
        self._root_der = der
        self._root = root
        self._v2 = (
            dcap_appraisal_v2.load_collateral(self._collateral.fields)
            if self._collateral.tcb_info_version == 2
            else None
        )
        self._root_window = cert_window(root, f"the trusted root {certificate_name(root)!r}")

    # -- PlatformVerifier ---------------------------------------------------------------------

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        return self.verify_with_chain(evidence, self.verify_chain(evidence, at), at)

    def chain_cache_key(self, evidence: bytes) -> bytes:
        return self._cache_key(self._parse(evidence))

    # -- CachingPlatformVerifier ----------------------------------------------------------------

    def verify_chain(self, evidence: bytes, at: datetime) -> DcapChain:
        """The whole appraisal at ``at`` (dcap-qvl, or for TCB info v2 ``dcap_appraisal_v2``);
        returns what every quote of this platform shares."""
        at = _aware(at)
        quote = self._parse(evidence)
        certs = _pck_chain(quote)
        key = _attestation_key(quote.attestation_key)
        # Checked here too, so a bad quote signature is reported as such and not as a chain
        # failure that the verifier core would share with every quote of the same platform.
        _check_quote_signature(quote, key)
        windows = [self._root_window, *self._collateral.windows]
        names = ("the PCK leaf certificate", "the PCK CA certificate", "the PCK chain's root certificate")
        try:
            windows += [cert_window(cert, what) for cert, what in zip(certs, names, strict=True)]
        except CERT_ERRORS:
            raise MalformedEvidence("a PCK certificate's validity cannot be read") from None
        check_windows(windows, at)
        if not hmac.compare_digest(certs[-1].public_bytes(Encoding.DER), self._root_der):
            # dcap-qvl anchors at the root it is given and would ignore the quote's copy.
            raise ChainInvalid("the DCAP quote's PCK chain does not end at the trusted root")
        if self._v2 is not None:
            appraisal = dcap_appraisal_v2.appraise(quote, certs, self._root, self._v2)
            fmspc, tcb_status, advisories = appraisal.fmspc, appraisal.tcb_status, appraisal.advisories
        else:
            fmspc, tcb_status, advisories = self._appraise_v3(quote, certs, at)
        return DcapChain(
            platform=self.platform,
            key_digest=hashlib.sha256(self._cache_key(quote)).digest(),
            attestation_key=quote.attestation_key,
            public_key=key,
            tcb_status=tcb_status,
            advisories=advisories,
            fmspc=fmspc,
            not_before=max(window.not_before for window in windows),
            not_after=min(window.not_after for window in windows),
        )

    def _appraise_v3(
        self, quote: Quote, certs: list[x509.Certificate], at: datetime
    ) -> tuple[str, str, tuple[str, ...]]:
        """dcap-qvl's appraisal: the FMSPC, the TCB status and the advisories."""
        try:
            fmspc = bytes(
                dcap_qvl.parse_pck_extension_from_pem(certs[0].public_bytes(Encoding.PEM)).fmspc
            ).hex()
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException:  # ValueError, or a Rust panic (pyo3 PanicException)
            raise ChainInvalid("the PCK leaf certificate has no readable Intel SGX extension") from None
        if fmspc != self._collateral.fmspc:
            raise ChainInvalid(
                f"the quote's platform FMSPC {fmspc} is not the collateral's {self._collateral.fmspc}"
            )
        native = self._collateral.native
        if native is None:  # pragma: no cover - only v2 collateral has none, and it is appraised above
            raise ChainInvalid("the DCAP collateral cannot be appraised by dcap-qvl")
        try:
            report = dcap_qvl.verify_with_root_ca(quote.raw, native, self._root_der, int(at.timestamp()))
            status = str(report.status)
            advisories = tuple(sorted(str(item) for item in report.advisory_ids))
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # ValueError, or a Rust panic (pyo3 PanicException)
            raise _native_error(exc) from None
        tcb_status = _STATUS_NAMES.get(status)
        if tcb_status is None:
            raise ChainInvalid(f"dcap-qvl reported an unknown TCB status {status[:60]!r}")
        return fmspc, tcb_status, advisories

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        """Only the quote signature, with the attestation key of the given verified chain."""
        at = _aware(at)
        quote = self._parse(evidence)
        if not isinstance(chain, DcapChain) or chain.platform != self.platform:
            raise ChainInvalid(f"not a verified {self.platform} DCAP chain")
        if not hmac.compare_digest(chain.attestation_key, quote.attestation_key):
            raise ChainInvalid("the DCAP quote carries another attestation key than the verified chain")
        if not hmac.compare_digest(chain.key_digest, hashlib.sha256(self._cache_key(quote)).digest()):
            raise ChainInvalid(
                "the DCAP quote's QE report, PCK chain or TCB fields differ from the verified chain"
            )
        if at < chain.not_before:
            raise ChainInvalid(f"the verified DCAP chain is not valid before {chain.not_before.isoformat()}")
        if at > chain.not_after:
            raise ChainInvalid(f"the verified DCAP chain expired at {chain.not_after.isoformat()}")
        _check_quote_signature(quote, chain.public_key)
        return self._claims(evidence, quote, chain)

    # -- internals ------------------------------------------------------------------------------

    def _parse(self, evidence: bytes) -> Quote:
        quote = parse_quote(evidence)
        if quote.tee_type != self._tee_type or quote.version not in self._versions:
            raise MalformedEvidence(
                f"a DCAP quote v{quote.version} with TEE type {quote.tee_type:#x}"
                f" is not {self.platform} evidence"
            )
        if quote.attestation_key_type != ATTESTATION_KEY_ECDSA_P256:
            raise MalformedEvidence(
                f"DCAP quote attestation key type {quote.attestation_key_type}"
                " is not supported (2, ECDSA P-256)"
            )
        if quote.qe_vendor_id != INTEL_QE_VENDOR_ID:
            raise MalformedEvidence("the DCAP quote's QE vendor is not Intel")
        return quote

    def _cache_key(self, quote: Quote) -> bytes:
        parts = [
            self.platform.encode(),
            self._collateral.digest,
            quote.header,
            quote.attestation_key,
            quote.qe_report,
            quote.qe_report_signature,
            quote.qe_auth_data,
            quote.cert_data,
            self._tcb_fields(quote),
        ]
        return b"".join(len(part).to_bytes(4, "big") + part for part in parts)

    def _tcb_fields(self, quote: Quote) -> bytes:
        return b""

    def _claims(self, evidence: bytes, quote: Quote, chain: DcapChain) -> Claims:
        raise NotImplementedError


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    return at


class SgxDcapVerifier(_DcapVerifier):
    """``PlatformVerifier`` for platform ``sgx``: SGX ECDSA quotes v3 against one FMSPC's collateral
    (TCB info v3, or v2)."""

    platform: str = "sgx"
    _tee_type = TEE_SGX
    _versions = (3,)
    _tcb_info_id = "SGX"
    _qe_identity_id = "QE"

    def _claims(self, evidence: bytes, quote: Quote, chain: DcapChain) -> Claims:
        report = quote.report
        if not isinstance(report, SgxReport):  # the version check admits only v3 SGX bodies
            raise MalformedEvidence("the DCAP quote does not carry an SGX enclave report")
        details = {
            "attributes": report.attributes.hex(),
            "fmspc": chain.fmspc,
            "misc_select": report.misc_select.to_bytes(4, "little").hex(),
            "pce_svn": str(quote.pce_svn),
            "qe_svn": str(quote.qe_svn),
            "quote_version": str(quote.version),
        }
        return Claims(
            platform=self.platform,
            measurement=report.mr_enclave.hex(),
            signer=report.mr_signer.hex(),
            product_id=report.isv_prod_id,
            svn=report.isv_svn,
            debug=report.debug,
            tcb_status=chain.tcb_status,
            report_data=report.report_data.hex(),
            evidence_digest=hashlib.sha256(evidence).hexdigest(),
            evidence_time=None,
            cpu_svn=report.cpu_svn.hex(),
            advisories=chain.advisories,
            details=tuple(sorted(details.items())),
        )


class TdxVerifier(_DcapVerifier):
    """``PlatformVerifier`` for platform ``tdx``: TDX quotes v4 and v5 (TD 1.0 and 1.5 bodies)
    against one FMSPC's collateral."""

    platform: str = "tdx"
    _tee_type = TEE_TDX
    _versions = (4, 5)
    _tcb_info_id = "TDX"
    _qe_identity_id = "TD_QE"

    def _tcb_fields(self, quote: Quote) -> bytes:
        # TEE_TCB_SVN, MRSEAM, MRSIGNERSEAM, SEAM_ATTRIBUTES; TD 1.5: TEE_TCB_SVN2, MRSERVICETD.
        tail = quote.body[TD10_SIZE:] if quote.body_type == BODY_TD15 else b""
        return quote.body[:120] + tail

    def _parse(self, evidence: bytes) -> Quote:
        quote = super()._parse(evidence)
        if quote.body_type == BODY_SGX:
            raise MalformedEvidence("a DCAP quote v5 with an SGX body is not tdx evidence")
        return quote

    def _claims(self, evidence: bytes, quote: Quote, chain: DcapChain) -> Claims:
        report = quote.report
        if not isinstance(report, TdReport):
            raise MalformedEvidence("the DCAP quote does not carry a TD report")
        details = {
            "fmspc": chain.fmspc,
            "mrconfigid": report.mr_config_id.hex(),
            "mrowner": report.mr_owner.hex(),
            "mrownerconfig": report.mr_owner_config.hex(),
            "mrseam": report.mr_seam.hex(),
            "mrsignerseam": report.mr_signer_seam.hex(),
            "pce_svn": str(quote.pce_svn),
            "qe_svn": str(quote.qe_svn),
            "quote_version": str(quote.version),
            "seam_attributes": report.seam_attributes.hex(),
            "td_attributes": report.td_attributes.hex(),
            "tee_tcb_svn": report.tee_tcb_svn.hex(),
            "xfam": report.xfam.hex(),
            **{f"rtmr{index}": value.hex() for index, value in enumerate(report.rtmr)},
        }
        if report.tee_tcb_svn2 is not None and report.mr_service_td is not None:
            details["tee_tcb_svn2"] = report.tee_tcb_svn2.hex()
            details["mrservicetd"] = report.mr_service_td.hex()
        return Claims(
            platform=self.platform,
            measurement=report.mr_td.hex(),
            signer=report.mr_owner.hex(),
            product_id=0,
            svn=0,
            debug=report.debug,
            tcb_status=chain.tcb_status,
            report_data=report.report_data.hex(),
            evidence_digest=hashlib.sha256(evidence).hexdigest(),
            evidence_time=None,
            cpu_svn=report.tee_tcb_svn.hex(),
            advisories=chain.advisories,
            details=tuple(sorted(details.items())),
        )
