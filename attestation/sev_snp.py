"""Verifier for AMD SEV-SNP attestation reports (platform ``sev-snp``).

Evidence is one of

* the raw 1184-byte report (see ``attestation.sev_snp_report``), with the VCEK/VLEK certificate
  given as the verifier's ``collateral``;
* the raw report followed by the certificate(s): the VCEK/VLEK as DER (optionally followed by more
  DER certificates) or as PEM (VCEK/VLEK first, then optionally ASK/ASVK and ARK);
* the JSON form trustee sends: ``{"attestation_report": {...}, "cert_chain": [{"cert_type":
  "VCEK", "data": [...]}, ...]}``, whose report is rebuilt byte for byte from its fields.

Checks, in order:

1. structure (``MalformedEvidence``);
2. the chain VCEK/VLEK <- ASK/ASVK <- ARK at ``at`` (``ChainInvalid``): RSA-PSS with SHA-384,
   MGF1-SHA-384 and a 48-byte salt; the product (Milan, Genoa, Turin) is the VCEK issuer's name
   (``SEV-<product>``; ``SEV-VLEK-<product>`` for a VLEK). The ARKs are pinned by SHA-256 (the
   bundle in ``attestation/roots``); the ASK/ASVK comes from the evidence or the collateral when
   given there, otherwise from the bundle (there is no bundled ASVK for Genoa or Turin). An ARK
   the evidence carries must be the trusted one;
3. the report signature, ECDSA P-384 with SHA-384 over bytes 0x000..0x29F with the VCEK/VLEK key
   (``EvidenceSignatureInvalid``);
4. the signed fields against the certificate (``ChainInvalid``): the signing key kind (VCEK/VLEK)
   matches the certificate, the certificate's TCB extensions (bl, tee, snp, ucode; fmc on Turin)
   equal ``reported_tcb``, and a VCEK's hwID equals ``chip_id`` (its first 8 bytes on Turin);
   a v3 report's CPUID family matches the product (0x19 Milan/Genoa, 0x1A Turin).

Claims: ``measurement`` is the launch measurement; ``signer`` is ``id_key_digest``, or
``author_key_digest`` when the report says an author key signed the ID key (``author_key_en``:
the author key is then the more stable identity); ``product_id`` is always 0 (SEV-SNP has none;
the 16-byte ``family_id`` and ``image_id`` are in ``details``); ``svn`` is ``guest_svn``;
``debug`` is policy bit 19. ``tcb_status`` is ``UpToDate`` when ``reported_tcb`` equals
``current_tcb`` in every component and ``OutOfDate`` otherwise (the host reports an older TCB
than the firmware runs, so the VCEK that signs is the one of an older, weaker TCB). SEV-SNP
reports carry no time: ``evidence_time`` is None.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from attestation.certs import CERT_ERRORS, ca_extensions, check_validity
from attestation.claims import Claims
from attestation.errors import ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence
from attestation.sev_snp_report import (
    PRODUCTS,
    REPORT_SIZE,
    SIG_ALGO_ECDSA_P384_SHA384,
    SIGNING_KEY_VCEK,
    SIGNING_KEY_VLEK,
    SnpReport,
    TcbVersion,
    decode_tcb,
    json_bytes,
    parse_report,
    report_from_json,
)

__all__ = ["PINNED_ARK_SHA256", "SevSnpVerifier", "SnpChain", "pinned_roots"]

#: SHA-256 of the DER of each AMD root key certificate (ARK) this build trusts.
PINNED_ARK_SHA256 = {
    "Milan": "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
    "Genoa": "4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
    "Turin": "1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
}
#: The bundled AMD KDS ``cert_chain`` files (intermediate first, then the ARK), per product and key.
_BUNDLE = {
    ("Milan", "vcek"): "amd_milan_ask_ark.pem",
    ("Genoa", "vcek"): "amd_genoa_ask_ark.pem",
    ("Turin", "vcek"): "amd_turin_ask_ark.pem",
    ("Milan", "vlek"): "amd_milan_asvk_ark.pem",
}

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
# The outer signatureAlgorithm of AMD certificates: RSASSA-PSS, SHA-384, MGF1-SHA-384, salt 48,
# with and without the (default) trailerField 1. Anything else is another encoding of the same
# signature, which would give one certificate several DERs that all verify.
_PSS_ALGIDS = (
    bytes.fromhex(
        "304606092a864886f70d01010a3039a00f300d06096086480165030402020500a11c301a06092a864886f70d0101"
        "08300d06096086480165030402020500a203020130a303020101"
    ),
    bytes.fromhex(
        "304106092a864886f70d01010a3034a00f300d06096086480165030402020500a11c301a06092a864886f70d0101"
        "08300d06096086480165030402020500a203020130"
    ),
)

_OID_PRODUCT_NAME = "1.3.6.1.4.1.3704.1.2"
_OID_TCB = {
    "bootloader": "1.3.6.1.4.1.3704.1.3.1",
    "tee": "1.3.6.1.4.1.3704.1.3.2",
    "snp": "1.3.6.1.4.1.3704.1.3.3",
    "microcode": "1.3.6.1.4.1.3704.1.3.8",
    "fmc": "1.3.6.1.4.1.3704.1.3.9",
}
_OID_HWID = "1.3.6.1.4.1.3704.1.4"
_CPUID_FAMILY = {"Milan": 0x19, "Genoa": 0x19, "Turin": 0x1A}
_HWID_SIZE = {"Milan": 64, "Genoa": 64, "Turin": 8}

_MAX_CERTS = 8


# -- certificates -----------------------------------------------------------------------------------

# ``warnings.catch_warnings`` swaps the process-wide filters, so two threads interleaving it could
# leave "ignore" installed for good: every use here holds this lock (re-entrant: they nest).
_WARNINGS_LOCK = threading.RLock()


@contextmanager
def _quiet() -> Iterator[None]:
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _load_der(der: bytes, what: str) -> x509.Certificate:
    # AMD issues VCEK/VLEK certificates with serial number 0, which RFC 5280 forbids and
    # ``cryptography`` warns about (CryptographyDeprecationWarning); the serial means nothing here.
    try:
        with _quiet():
            return x509.load_der_x509_certificate(der)
    except CERT_ERRORS:
        raise MalformedEvidence(f"the {what} is not a DER X.509 certificate") from None


def _der_length(data: bytes, pos: int) -> int:
    """Total size of the DER SEQUENCE at ``pos`` (tag, length and content)."""
    if pos + 2 > len(data) or data[pos] != 0x30:
        raise MalformedEvidence("the certificate data is not a DER SEQUENCE")
    first = data[pos + 1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if not 1 <= count <= 3 or pos + 2 + count > len(data):
        raise MalformedEvidence("the certificate data has a bad DER length")
    return 2 + count + int.from_bytes(data[pos + 2 : pos + 2 + count], "big")


def _split_certs(blob: bytes) -> tuple[bytes, ...]:
    """DER certificates from PEM text or concatenated DER."""
    text = blob.lstrip()
    if text.startswith(b"-----BEGIN"):
        try:
            with _quiet():
                certs = x509.load_pem_x509_certificates(text)
        except CERT_ERRORS:
            raise MalformedEvidence("the certificates are not PEM X.509 certificates") from None
        ders = tuple(cert.public_bytes(Encoding.DER) for cert in certs)
    else:
        out = []
        pos = 0
        while pos < len(blob):
            size = _der_length(blob, pos)
            if pos + size > len(blob):
                raise MalformedEvidence("the DER certificate data is truncated")
            out.append(blob[pos : pos + size])
            pos += size
            if len(out) > _MAX_CERTS:
                break
        ders = tuple(out)
    if not ders:
        raise MalformedEvidence("no certificate found in the certificate data")
    if len(ders) > _MAX_CERTS:
        raise MalformedEvidence(f"more than {_MAX_CERTS} certificates")
    return ders


def _common_name(name: x509.Name) -> str:
    try:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    except CERT_ERRORS:
        return ""
    value = attrs[0].value if len(attrs) == 1 else ""
    return value if isinstance(value, str) else ""


def _check_encoding(cert: x509.Certificate, der: bytes, what: str) -> None:
    try:
        tbs = cert.tbs_certificate_bytes
        signature = cert.signature
    except CERT_ERRORS:
        raise ChainInvalid(f"the {what} cannot be read") from None
    start = der.find(tbs)
    middle = der[start + len(tbs) : len(der) - len(signature)] if start > 0 else b""
    if not any(middle.startswith(algid) for algid in _PSS_ALGIDS) or not middle.endswith(b"\x00"):
        raise ChainInvalid(f"the {what} is not signed with AMD's RSA-PSS (SHA-384, salt 48) encoding")


def _check_signed_by(cert: x509.Certificate, issuer: x509.Certificate, what: str, by: str) -> None:
    if cert.issuer != issuer.subject:
        raise ChainInvalid(f"the {what} is not issued by the {by} (issuer names differ)")
    try:
        if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
            raise ChainInvalid(f"the {what} is not signed with RSA-PSS")
        key = issuer.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise ChainInvalid(f"the {by} key is not an RSA key")
        key.verify(cert.signature, cert.tbs_certificate_bytes, _PSS, hashes.SHA384())
    except (*CERT_ERRORS, InvalidSignature):
        raise ChainInvalid(f"the {what}'s signature does not verify with the {by} key") from None


def _check_ca(cert: x509.Certificate, what: str) -> None:
    constraints, usage = ca_extensions(cert, what)
    if not constraints.ca or not usage.key_cert_sign:
        raise ChainInvalid(f"the {what} is not a CA certificate (CA:true, keyCertSign)")


def _load_root(data: bytes) -> x509.Certificate:
    text = data.lstrip()
    try:
        with _quiet():
            if text.startswith(b"-----BEGIN"):
                certs = x509.load_pem_x509_certificates(text)
                root = certs[-1]  # an AMD cert_chain file ends with the ARK
            else:
                root = x509.load_der_x509_certificate(data)
    except CERT_ERRORS:
        raise ValueError("an SEV-SNP root is not an X.509 certificate (PEM or DER)") from None
    try:
        _check_signed_by(root, root, "ARK", "ARK")
        _check_ca(root, "ARK")
    except ChainInvalid as exc:
        raise ValueError(f"an SEV-SNP root is not a self-signed AMD root: {exc}") from None
    return root


def _bundle_text(name: str) -> bytes:
    return resources.files("attestation").joinpath("roots", name).read_bytes()


@cache
def pinned_roots() -> Mapping[str, bytes]:
    """The bundled ARKs (DER) per product, each checked against ``PINNED_ARK_SHA256``."""
    roots: dict[str, bytes] = {}
    for (product, kind), name in _BUNDLE.items():
        if kind != "vcek":
            continue
        der = _split_certs(_bundle_text(name))[-1]
        if hashlib.sha256(der).hexdigest() != PINNED_ARK_SHA256[product]:
            raise RuntimeError(f"the bundled ARK for {product} ({name}) does not match its pinned SHA-256")
        roots[product] = der
    return MappingProxyType(roots)


@cache
def _bundled_intermediate(product: str, kind: str) -> bytes | None:
    name = _BUNDLE.get((product, kind))
    return _split_certs(_bundle_text(name))[0] if name else None


# -- evidence -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Evidence:
    report: SnpReport
    certs: tuple[bytes, ...]  # DER, the VCEK/VLEK first


def _json_certs(chain: object) -> tuple[bytes, ...]:
    if chain is None:
        return ()
    if not isinstance(chain, list) or len(chain) > _MAX_CERTS:
        raise MalformedEvidence(f"SEV-SNP JSON cert_chain is not a list of at most {_MAX_CERTS} entries")
    leaves: list[bytes] = []
    others: list[bytes] = []
    for entry in chain:
        if not isinstance(entry, dict) or not isinstance(entry.get("cert_type"), str):
            raise MalformedEvidence("SEV-SNP JSON cert_chain entry has no cert_type")
        data = json_bytes(entry.get("data"), None, "cert_chain.data")
        (leaves if entry["cert_type"] in ("VCEK", "VLEK") else others).append(data)
    if len(leaves) != 1:
        raise MalformedEvidence("SEV-SNP JSON cert_chain must hold exactly one VCEK or VLEK")
    return (leaves[0], *others)


def _parse(evidence: bytes, collateral: tuple[bytes, ...]) -> _Evidence:
    if not isinstance(evidence, bytes | bytearray | memoryview):
        raise MalformedEvidence("SEV-SNP evidence must be bytes")
    data = bytes(evidence)
    if data.lstrip()[:1] == b"{":
        try:
            document: Any = json.loads(data)
        except (ValueError, RecursionError):
            raise MalformedEvidence("SEV-SNP JSON evidence is not valid JSON") from None
        if not isinstance(document, dict):
            raise MalformedEvidence("SEV-SNP JSON evidence is not an object")
        report = parse_report(report_from_json(document.get("attestation_report")))
        certs = _json_certs(document.get("cert_chain"))
    else:
        if len(data) < REPORT_SIZE:
            raise MalformedEvidence(f"SEV-SNP evidence is {len(data)} bytes, a report is {REPORT_SIZE}")
        report = parse_report(data[:REPORT_SIZE])
        rest = data[REPORT_SIZE:]
        certs = _split_certs(rest) if rest else ()
    if not certs:
        certs = collateral
    if not certs:
        raise MalformedEvidence("SEV-SNP evidence has no VCEK/VLEK certificate and none was configured")
    return _Evidence(report, certs)


def _cache_key(certs: tuple[bytes, ...]) -> bytes:
    digest = hashlib.sha256(b"sev-snp chain v1")
    for der in certs:
        digest.update(len(der).to_bytes(4, "big"))
        digest.update(der)
    return digest.digest()


# -- the verified chain ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SnpChain:
    """A VCEK/VLEK that chains to a trusted ARK; usable from ``not_before`` to ``not_after``."""

    key: ec.EllipticCurvePublicKey
    product: str  # Milan | Genoa | Turin
    signing_key: str  # vcek | vlek
    not_before: datetime
    not_after: datetime
    tcb: TcbVersion  # the certificate's TCB extensions
    hwid: bytes | None  # a VCEK's chip id; None for a VLEK
    cache_key: bytes


def _ext_int(value: bytes, what: str) -> int:
    # A DER INTEGER 0..255 (AMD writes 217 as 02 02 00 d9).
    if len(value) < 3 or value[0] != 0x02 or value[1] != len(value) - 2 or value[1] > 2:
        raise ChainInvalid(f"the certificate's {what} extension is not a small INTEGER")
    number = int.from_bytes(value[2:], "big", signed=True)
    if not 0 <= number <= 255:
        raise ChainInvalid(f"the certificate's {what} extension is out of range")
    return number


def _leaf_extensions(cert: x509.Certificate, product: str, kind: str) -> tuple[TcbVersion, bytes | None]:
    try:
        values: dict[str, bytes] = {}
        for extension in cert.extensions:
            if isinstance(extension.value, x509.UnrecognizedExtension):
                values[extension.oid.dotted_string] = extension.value.value
    except CERT_ERRORS:
        raise ChainInvalid(f"the {kind.upper()}'s extensions cannot be read") from None
    name = values.get(_OID_PRODUCT_NAME, b"")
    if (
        len(name) < 2
        or name[0] != 0x16
        or name[1] != len(name) - 2
        or not name[2:].startswith(product.encode())
    ):
        raise ChainInvalid(f"the {kind.upper()}'s product name extension does not name {product}")
    needed = ["bootloader", "tee", "snp", "microcode"] + (["fmc"] if product == "Turin" else [])
    numbers: dict[str, int] = {}
    for field in needed:
        raw = values.get(_OID_TCB[field])
        if raw is None:
            raise ChainInvalid(f"the {kind.upper()} has no {field} TCB extension")
        numbers[field] = _ext_int(raw, field)
    tcb = TcbVersion(
        bootloader=numbers["bootloader"],
        tee=numbers["tee"],
        snp=numbers["snp"],
        microcode=numbers["microcode"],
        fmc=numbers.get("fmc"),
    )
    hwid = values.get(_OID_HWID)
    if kind == "vcek" and (hwid is None or len(hwid) != _HWID_SIZE[product]):
        raise ChainInvalid(f"the VCEK has no {_HWID_SIZE[product]}-byte hwID extension")
    return tcb, (hwid if kind == "vcek" else None)


def _leaf_kind(cert: x509.Certificate) -> tuple[str, str]:
    """(product, vcek|vlek) from the leaf's issuer and subject names."""
    issuer = _common_name(cert.issuer)
    subject = _common_name(cert.subject)
    for product in PRODUCTS:
        if issuer == f"SEV-{product}" and subject == "SEV-VCEK":
            return product, "vcek"
        if issuer == f"SEV-VLEK-{product}" and subject == "SEV-VLEK":
            return product, "vlek"
    raise ChainInvalid(
        f"the attestation key certificate ({subject or '?'} issued by {issuer or '?'}) is not an AMD "
        f"VCEK/VLEK of {', '.join(PRODUCTS)}"
    )


# -- the verifier ---------------------------------------------------------------------------------


class SevSnpVerifier:
    """``CachingPlatformVerifier`` for platform ``sev-snp``.

    ``collateral``: the VCEK/VLEK certificate (DER or PEM), optionally followed by the ASK/ASVK
    and ARK as PEM, used for evidence that carries no certificate. ``roots``: the ARK per product
    (``{"Milan": <PEM or DER>, ...}``); by default the pinned bundle (``pinned_roots()``).
    """

    platform: str = "sev-snp"
    #: ``verify_with_chain`` is one ECDSA P-384 check (about 150-300 us here), more than a thread
    #: hand-off costs: it runs in the core's thread pool.
    verify_with_chain_inline: bool = False

    def __init__(self, collateral: bytes | None = None, *, roots: Mapping[str, bytes] | None = None) -> None:
        try:
            self._collateral = _split_certs(collateral) if collateral else ()
        except MalformedEvidence as exc:
            raise ValueError(f"the SEV-SNP collateral is not certificates: {exc}") from None
        source = pinned_roots() if roots is None else roots
        self._roots: dict[str, x509.Certificate] = {}
        self._root_ders: dict[str, bytes] = {}
        for product, data in source.items():
            root = _load_root(data)
            if _common_name(root.subject) != f"ARK-{product}":
                raise ValueError(f"the SEV-SNP root given for {product} is not named ARK-{product}")
            self._roots[product] = root
            self._root_ders[product] = root.public_bytes(Encoding.DER)

    def verify(self, evidence: bytes, *, at: datetime) -> Claims:
        return self.verify_with_chain(evidence, self.verify_chain(evidence, at), at)

    def chain_cache_key(self, evidence: bytes) -> bytes:
        """SHA-256 over the DER of the VCEK/VLEK and every other certificate the evidence (or the
        collateral) supplies: all ``verify_chain`` reads besides the pinned roots and bundle."""
        return _cache_key(_parse(evidence, self._collateral).certs)

    def verify_chain(self, evidence: bytes, at: datetime) -> SnpChain:
        """VCEK/VLEK -> ASK/ASVK -> ARK at ``at``."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        certs = _parse(evidence, self._collateral).certs
        # ``cryptography`` parses some fields (names, extensions) only when read, and warns about
        # malformed ones (a country name of the wrong length, serial 0): those warnings say
        # nothing the checks below do not, and a hostile certificate must not flood the log.
        with _quiet():
            try:
                return self._verify_chain(certs, at)
            except CERT_ERRORS:
                raise ChainInvalid("a certificate in the SEV-SNP chain cannot be read") from None

    def _verify_chain(self, certs: tuple[bytes, ...], at: datetime) -> SnpChain:
        leaf = _load_der(certs[0], "VCEK/VLEK certificate")
        _check_encoding(leaf, certs[0], "VCEK/VLEK certificate")
        product, kind = _leaf_kind(leaf)
        label = kind.upper()
        ca_label = "ASK" if kind == "vcek" else "ASVK"
        root = self._roots.get(product)
        if root is None:
            raise ChainInvalid(f"no trusted ARK for {product}")
        intermediate: x509.Certificate | None = None
        for der in certs[1:]:
            cert = _load_der(der, "chain certificate")
            if cert.subject == cert.issuer:
                if not hmac.compare_digest(der, self._root_ders[product]):
                    raise ChainInvalid(f"the evidence carries an ARK that is not the trusted ARK-{product}")
            elif cert.subject == leaf.issuer and intermediate is None:
                _check_encoding(cert, der, ca_label)
                intermediate = cert
            else:
                raise ChainInvalid(f"the evidence carries a certificate that is not in the {label}'s chain")
        if intermediate is None:
            bundled = _bundled_intermediate(product, kind)
            if bundled is None:
                raise ChainInvalid(f"no {ca_label} for {product} was given and none is bundled")
            intermediate = _load_der(bundled, ca_label)
        check_validity(root, at, f"ARK-{product}")
        _check_signed_by(intermediate, root, ca_label, f"ARK-{product}")
        _check_ca(intermediate, ca_label)
        check_validity(intermediate, at, ca_label)
        _check_signed_by(leaf, intermediate, label, ca_label)
        check_validity(leaf, at, label)
        try:
            key = leaf.public_key()
        except CERT_ERRORS:
            raise ChainInvalid(f"the {label}'s public key cannot be read") from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            raise ChainInvalid(f"the {label} key is not an ECDSA P-384 key")
        tcb, hwid = _leaf_extensions(leaf, product, kind)
        certs_used = (root, intermediate, leaf)
        return SnpChain(
            key=key,
            product=product,
            signing_key=kind,
            not_before=max(cert.not_valid_before_utc for cert in certs_used),
            not_after=min(cert.not_valid_after_utc for cert in certs_used),
            tcb=tcb,
            hwid=hwid,
            cache_key=_cache_key(certs),
        )

    def verify_with_chain(self, evidence: bytes, chain: object, at: datetime) -> Claims:
        """The report signature with an already verified chain, then the signed fields."""
        if at.tzinfo is None:
            raise ValueError("at must be timezone-aware")
        parsed = _parse(evidence, self._collateral)
        report = parsed.report
        if not isinstance(chain, SnpChain) or not hmac.compare_digest(
            chain.cache_key, _cache_key(parsed.certs)
        ):
            raise ChainInvalid("SEV-SNP evidence carries other certificates than the verified chain")
        if not chain.not_before <= at <= chain.not_after:
            raise ChainInvalid(
                f"the {chain.signing_key.upper()} chain is not valid at {at.isoformat()} (valid "
                f"{chain.not_before.isoformat()} to {chain.not_after.isoformat()})"
            )
        if report.mask_chip_key:
            # MASK_CHIP_KEY: the firmware wrote zeros instead of a signature; nothing vouches for it.
            raise EvidenceSignatureInvalid("SEV-SNP report is unsigned (the chip key was masked)")
        signature = encode_dss_signature(report.signature_r, report.signature_s)
        try:
            chain.key.verify(signature, report.signed, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise EvidenceSignatureInvalid(
                f"SEV-SNP report signature does not verify with the {chain.signing_key.upper()} key"
            ) from None
        # The fields below are signed: interpret them only now.
        if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise MalformedEvidence(f"SEV-SNP report signature algorithm {report.signature_algo} is not 1")
        kind = {SIGNING_KEY_VCEK: "vcek", SIGNING_KEY_VLEK: "vlek"}.get(report.signing_key)
        if kind != chain.signing_key:
            raise ChainInvalid(
                f"the report says signing key {report.signing_key}, the certificate is a "
                f"{chain.signing_key.upper()}"
            )
        if report.cpuid_family is not None and report.cpuid_family != _CPUID_FAMILY[chain.product]:
            raise ChainInvalid(
                f"the report's CPUID family {report.cpuid_family:#x} is not {chain.product}'s "
                f"{_CPUID_FAMILY[chain.product]:#x}"
            )
        reported = decode_tcb(report.reported_tcb, chain.product)
        if reported != chain.tcb:
            raise ChainInvalid(
                f"the {kind.upper()} is for TCB {chain.tcb.describe()}, the report's reported_tcb is "
                f"{reported.describe()}"
            )
        if chain.hwid is not None and not hmac.compare_digest(chain.hwid, report.chip_id[: len(chain.hwid)]):
            raise ChainInvalid("the VCEK is for another chip than the report's chip_id")
        current = decode_tcb(report.current_tcb, chain.product)
        return Claims(
            platform=self.platform,
            measurement=report.measurement.hex(),
            signer=(report.author_key_digest if report.author_key_en else report.id_key_digest).hex(),
            product_id=0,
            svn=report.guest_svn,
            debug=report.debug,
            tcb_status="UpToDate" if reported == current else "OutOfDate",
            report_data=report.report_data.hex(),
            evidence_digest=hashlib.sha256(evidence).hexdigest(),
            evidence_time=None,
            details=_details(report, chain),
        )


def _details(report: SnpReport, chain: SnpChain) -> tuple[tuple[str, str], ...]:
    details = {
        "author_key_digest": report.author_key_digest.hex(),
        "author_key_en": str(report.author_key_en).lower(),
        "chip_id": report.chip_id.hex(),
        "committed_fw": "{}.{}.{}".format(*report.committed_version),
        "committed_tcb": report.committed_tcb.hex(),
        "current_fw": "{}.{}.{}".format(*report.current_version),
        "current_tcb": report.current_tcb.hex(),
        "family_id": report.family_id.hex(),
        "host_data": report.host_data.hex(),
        "id_key_digest": report.id_key_digest.hex(),
        "image_id": report.image_id.hex(),
        "launch_tcb": report.launch_tcb.hex(),
        "platform_info": f"{report.platform_info:#x}",
        "policy": f"{report.policy:#x}",
        "product": chain.product.lower(),
        "report_id": report.report_id.hex(),
        "report_version": str(report.version),
        "reported_tcb": report.reported_tcb.hex(),
        "signing_key": chain.signing_key,
        "vmpl": str(report.vmpl),
    }
    if report.cpuid_family is not None:
        details["cpuid"] = (
            f"{report.cpuid_family:#04x}/{report.cpuid_model:#04x}/{report.cpuid_stepping:#04x}"
        )
    return tuple(sorted(details.items()))
