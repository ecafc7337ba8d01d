"""The TCB info v2 appraisal's decisions on collateral Intel never issued.

The dcap-rs quote is re-rooted under a test hierarchy with Intel's names (root, PCK Platform CA,
TCB Signing): its PCK leaf is re-issued for the same public key with the same Intel SGX
extension, so the quote signature and the QE report signature still verify, and the TCB info,
QE identity and CRLs are signed by the test keys. Each test then changes one thing and checks the
verdict: the TCB status combinations of Intel's QVL, revocation, every QE identity field, the
TCB level match, FMSPC and PCE-ID, and signers that do not chain to the trusted root. The PCK
extension reader is also fed hostile DER."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.dcap import SgxDcapVerifier
from attestation.dcap_pck_extension import SGX_EXTENSION_OID, parse_sgx_extension
from attestation.dcap_quote import parse_quote
from attestation.errors import ChainInvalid
from tests.unit.dcap_vectors import SGX_DCAPRS, pem_chain

AT = SGX_DCAPRS.at
FROM, TO = datetime(2020, 1, 1, tzinfo=UTC), datetime(2040, 1, 1, tzinfo=UTC)
assert SGX_DCAPRS.collateral is not None
REAL = json.loads(SGX_DCAPRS.collateral)
REAL_LEAF = x509.load_pem_x509_certificate(pem_chain(SGX_DCAPRS.evidence)[0])
# The TCB level the dcap-rs platform matches (2023-08-09, OutOfDate), and the QE's (isvsvn 8).
MATCHING_LEVEL = json.loads(REAL["tcb_info"])["tcbLevels"][2]

Key = ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Intel Corporation"),
        ]
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePublicKey,
    issuer: str,
    signer: Key,
    *,
    ca: bool,
    extension: x509.ExtensionType | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(FROM)
        .not_valid_after(TO)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if extension is not None:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class Forge:
    """A test hierarchy under Intel's names, and the knobs the tests turn."""

    root_key: Key
    ca_key: Key
    signing_key: Key
    tcb_info: dict[str, Any]
    qe_identity: dict[str, Any]
    ca_is_ca: bool = True
    signing_name: str = "Intel SGX TCB Signing"
    signing_issuer_key: Key | None = None  # None: the root
    root_crl_key: Key | None = None
    pck_crl_key: Key | None = None
    revoke: tuple[str, ...] = ()  # of "leaf", "ca", "signing"
    extension: x509.ExtensionType | None = None  # None: the real leaf's
    tcb_text_key: Key | None = None  # who signs the TCB info text (None: the signing key)
    qe_text_key: Key | None = None  # who signs the QE identity text (None: the signing key)
    edit: Callable[[dict[str, str]], None] | None = None  # a last change of the collateral JSON

    def build(self) -> tuple[SgxDcapVerifier, bytes]:
        root = _cert(
            "Intel SGX Root CA", self.root_key.public_key(), "Intel SGX Root CA", self.root_key, ca=True
        )
        ca_name = "Intel SGX PCK Platform CA"
        ca = _cert(ca_name, self.ca_key.public_key(), root_name(root), self.root_key, ca=self.ca_is_ca)
        leaf_key = REAL_LEAF.public_key()
        assert isinstance(leaf_key, ec.EllipticCurvePublicKey)
        extension = self.extension or REAL_LEAF.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
        leaf = _cert(
            "Intel SGX PCK Certificate", leaf_key, ca_name, self.ca_key, ca=False, extension=extension
        )
        signing = _cert(
            self.signing_name,
            self.signing_key.public_key(),
            "Intel SGX Root CA",
            self.signing_issuer_key or self.root_key,
            ca=False,
        )
        serials = {"leaf": leaf.serial_number, "ca": ca.serial_number, "signing": signing.serial_number}
        root_crl = _crl(
            "Intel SGX Root CA",
            self.root_crl_key or self.root_key,
            [serials[what] for what in ("ca", "signing") if what in self.revoke],
        )
        pck_crl = _crl(
            ca_name, self.pck_crl_key or self.ca_key, [serials["leaf"]] if "leaf" in self.revoke else []
        )
        tcb_text = json.dumps(self.tcb_info, separators=(",", ":"))
        qe_text = json.dumps(self.qe_identity, separators=(",", ":"))
        collateral = {
            "tcb_info": tcb_text,
            "tcb_info_signature": _sign(self.tcb_text_key or self.signing_key, tcb_text),
            "tcb_info_issuer_chain": pem(signing, root),
            "qe_identity": qe_text,
            "qe_identity_signature": _sign(self.qe_text_key or self.signing_key, qe_text),
            "qe_identity_issuer_chain": pem(signing, root),
            "pck_crl_issuer_chain": pem(ca, root),
            "root_ca_crl": root_crl.public_bytes(Encoding.DER).hex(),
            "pck_crl": pck_crl.public_bytes(Encoding.DER).hex(),
        }
        if self.edit is not None:
            self.edit(collateral)
        verifier = SgxDcapVerifier(json.dumps(collateral), root_ca_der=root.public_bytes(Encoding.DER))
        return verifier, _requoted(pem(leaf, ca, root).encode() + b"\0")


def pem(*certs: x509.Certificate) -> str:
    return "".join(cert.public_bytes(Encoding.PEM).decode() for cert in certs)


def root_name(root: x509.Certificate) -> str:
    value = root.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert isinstance(value, str)
    return value


def _crl(issuer: str, key: Key, serials: list[int]) -> x509.CertificateRevocationList:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_name(issuer))
        .last_update(datetime(2025, 2, 1, tzinfo=UTC))
        .next_update(datetime(2025, 4, 1, tzinfo=UTC))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(FROM).build()
        )
    return builder.sign(key, hashes.SHA256())


def _sign(key: Key, text: str) -> str:
    r, s = decode_dss_signature(key.sign(text.encode(), ec.ECDSA(hashes.SHA256())))
    return (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()


def _requoted(cert_data: bytes) -> bytes:
    """The dcap-rs quote with another PCK chain (the quote signature does not cover it)."""
    q = parse_quote(SGX_DCAPRS.evidence)
    qe = q.qe_report + q.qe_report_signature + len(q.qe_auth_data).to_bytes(2, "little") + q.qe_auth_data
    certification = (5).to_bytes(2, "little") + len(cert_data).to_bytes(4, "little") + cert_data
    signature_data = q.signature + q.attestation_key + qe + certification
    return q.signed + len(signature_data).to_bytes(4, "little") + signature_data


@pytest.fixture(scope="module")
def keys() -> tuple[Key, Key, Key]:
    return _key(), _key(), _key()


@pytest.fixture
def forge(keys: tuple[Key, Key, Key]) -> Forge:
    return Forge(
        *keys,
        tcb_info=copy.deepcopy(json.loads(REAL["tcb_info"])),
        qe_identity=copy.deepcopy(json.loads(REAL["qe_identity"])),
    )


def _status(forge: Forge) -> str:
    verifier, evidence = forge.build()
    return verifier.verify(evidence, at=AT).tcb_status


def test_re_rooted_the_quote_appraises_as_under_intel(forge: Forge) -> None:
    assert _status(forge) == "OutOfDate"
    # ... and only under the test root: the pinned Intel root refuses the re-rooted chain.
    _verifier, evidence = forge.build()
    with pytest.raises(ChainInvalid, match="does not end at the trusted root"):
        SgxDcapVerifier(SGX_DCAPRS.collateral or "").verify(evidence, at=AT)


@pytest.mark.parametrize(
    ("platform", "qe", "expected"),
    [
        ("UpToDate", "UpToDate", "UpToDate"),
        ("SWHardeningNeeded", "UpToDate", "SWHardeningNeeded"),
        ("ConfigurationNeeded", "UpToDate", "ConfigurationNeeded"),
        ("UpToDate", "OutOfDate", "OutOfDate"),
        ("SWHardeningNeeded", "OutOfDate", "OutOfDate"),
        ("ConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("ConfigurationAndSWHardeningNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("OutOfDate", "OutOfDate", "OutOfDate"),
        ("OutOfDateConfigurationNeeded", "OutOfDate", "OutOfDateConfigurationNeeded"),
        ("UpToDate", "Revoked", "Revoked"),
        ("Revoked", "UpToDate", "Revoked"),
    ],
)
def test_the_platform_and_qe_statuses_combine_as_intels_qvl_does(
    forge: Forge, platform: str, qe: str, expected: str
) -> None:
    forge.tcb_info["tcbLevels"] = [{**MATCHING_LEVEL, "tcbStatus": platform}]
    forge.qe_identity["tcbLevels"] = [
        {"tcb": {"isvsvn": 9}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": qe}
    ]
    assert _status(forge) == expected


def test_the_first_level_the_platform_meets_wins(forge: Forge) -> None:
    above = {**MATCHING_LEVEL, "tcb": {**MATCHING_LEVEL["tcb"], "pcesvn": 14}, "tcbStatus": "UpToDate"}
    equal = {**MATCHING_LEVEL, "tcbStatus": "SWHardeningNeeded"}
    below = {
        **MATCHING_LEVEL,
        "tcb": {**MATCHING_LEVEL["tcb"], "sgxtcbcomp01svn": 11},
        "tcbStatus": "OutOfDate",
    }
    forge.tcb_info["tcbLevels"] = [above, equal, below]
    assert _status(forge) == "SWHardeningNeeded"
    forge.tcb_info["tcbLevels"] = [above, below]
    assert _status(forge) == "OutOfDate"
    forge.qe_identity["tcbLevels"] = [
        {"tcb": {"isvsvn": 10}, "tcbDate": "2024-03-13T00:00:00Z", "tcbStatus": "UpToDate"}
    ]
    with pytest.raises(ChainInvalid, match="the QE's ISVSVN 9 is below every TCB level"):
        _status(forge)


def _set(path: str, value: object) -> Callable[[Forge], None]:
    """A change of ``tcb_info.<key>`` or ``qe_identity.<key>``."""
    document, key = path.split(".")

    def change(forge: Forge) -> None:
        getattr(forge, document)[key] = value

    return change


def _level(**changes: object) -> Callable[[Forge], None]:
    def change(forge: Forge) -> None:
        forge.tcb_info["tcbLevels"] = [{**MATCHING_LEVEL, **changes}]

    return change


def _attr(name: str, value: object) -> Callable[[Forge], None]:
    return lambda forge: setattr(forge, name, value)


def _edit(change: Callable[[dict[str, str]], None]) -> Callable[[Forge], None]:
    return _attr("edit", change)


def _first_block(chain: str) -> str:
    return pem_chain(chain.encode())[0].decode()


def _other_root() -> str:
    key = _key()
    return pem(_cert("Intel SGX Root CA", key.public_key(), "Intel SGX Root CA", key, ca=True))


REFUSALS: dict[str, tuple[Callable[[Forge], None], str]] = {
    "TCB info chain without the root": (
        _edit(lambda c: c.update(tcb_info_issuer_chain=_first_block(c["tcb_info_issuer_chain"]))),
        "the collateral's TCB info issuer chain is not a signer and the trusted root",
    ),
    "QE identity chain to another root": (
        _edit(
            lambda c: c.update(
                qe_identity_issuer_chain=_first_block(c["qe_identity_issuer_chain"]) + _other_root()
            )
        ),
        "the collateral's QE identity issuer chain is not a signer and the trusted root",
    ),
    "PCK CRL chain of another CA": (
        _edit(lambda c: c.update(pck_crl_issuer_chain=c["tcb_info_issuer_chain"])),
        "the collateral's PCK CRL issuer chain is not the quote's PCK CA and the trusted root",
    ),
    "leaf revoked": (_attr("revoke", ("leaf",)), "the PCK leaf certificate is revoked"),
    "PCK CA revoked": (_attr("revoke", ("ca",)), "the PCK CA certificate is revoked"),
    "TCB signing revoked": (_attr("revoke", ("signing",)), "the TCB info's signing certificate is revoked"),
    "PCK CA not a CA": (_attr("ca_is_ca", False), "the PCK CA certificate is not a CA certificate"),
    "root CRL by another key": (_attr("root_crl_key", _key()), "the Root CA CRL is not signed by"),
    "PCK CRL by another key": (_attr("pck_crl_key", _key()), "the PCK CRL is not signed by"),
    "TCB signer off the root": (_attr("signing_issuer_key", _key()), "signing certificate is not signed by"),
    "TCB signer misnamed": (_attr("signing_name", "Intel SGX PCK Platform CA"), "not Intel SGX TCB Signing"),
    "TCB info by another key": (_attr("tcb_text_key", _key()), "the TCB info signature does not verify"),
    "QE identity by another key": (_attr("qe_text_key", _key()), "the QE identity signature does not verify"),
    "no level matches": (_level(tcb={**MATCHING_LEVEL["tcb"], "pcesvn": 14}), r"TCB level not supported"),
    "unknown level status": (_level(tcbStatus="Fine"), "unknown tcbStatus 'Fine'"),
    "level svn not a number": (_level(tcb={**MATCHING_LEVEL["tcb"], "sgxtcbcomp16svn": "0"}), "not a int"),
    "other tcbType": (_set("tcb_info.tcbType", 1), "tcbType is not 0"),
    "other FMSPC": (_set("tcb_info.fmspc", "00606a000001"), "FMSPC 00606a000000 is not the collateral's"),
    "other PCE-ID": (_set("tcb_info.pceId", "0100"), "PCE-ID 0000 is not the TCB info's"),
    "QE MRSIGNER": (_set("qe_identity.mrsigner", "00" * 32), "MRSIGNER"),
    "QE ISVPRODID": (_set("qe_identity.isvprodid", 2), "ISVPRODID"),
    "QE MISCSELECT": (_set("qe_identity.miscselect", "01000000"), "MISCSELECT"),
    "QE ATTRIBUTES": (_set("qe_identity.attributes", "13" + "00" * 15), "ATTRIBUTES"),
    "QE mask hex": (_set("qe_identity.attributesMask", "zz"), "attributesMask is not 16 bytes"),
    "QE version": (_set("qe_identity.version", 3), "not enclaveIdentity 'QE' version 2"),
    "QE unknown status": (
        _set(
            "qe_identity.tcbLevels",
            [{"tcb": {"isvsvn": 1}, "tcbDate": "x", "tcbStatus": "ConfigurationNeeded"}],
        ),
        "unknown tcbStatus",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_broken_promise_is_a_one_line_chain_invalid(forge: Forge, case: str) -> None:
    change, message = REFUSALS[case]
    change(forge)
    with pytest.raises(ChainInvalid, match=message) as error:
        _status(forge)
    assert "\n" not in str(error.value)


# -- the PCK extension reader on hostile DER ---------------------------------------------------


def _leaf_with(value: bytes) -> x509.Certificate:
    key = _key()
    extension = x509.UnrecognizedExtension(SGX_EXTENSION_OID, value)
    return _cert("Intel SGX PCK Certificate", key.public_key(), "x", key, ca=False, extension=extension)


def _real_value() -> bytes:
    value = REAL_LEAF.extensions.get_extension_for_oid(SGX_EXTENSION_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


REAL_VALUE = _real_value()


def test_the_extension_reader_reads_the_real_value_and_refuses_every_truncation() -> None:
    assert parse_sgx_extension(_leaf_with(REAL_VALUE)).fmspc.hex() == "00606a000000"
    for cut in range(0, len(REAL_VALUE), 3):
        with pytest.raises(ChainInvalid, match="Intel SGX extension"):
            parse_sgx_extension(_leaf_with(REAL_VALUE[:cut]))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x30\x81\x05" + b"\x00" * 5, "non-minimal length"),
        (b"\x30\x80\x00\x00", "bad length"),
        (b"\x1f\x01\x00", "multi-byte tag"),
        (b"\x30\x00\x30\x00", "not one SEQUENCE"),
        (b"\x04\x00", "not one SEQUENCE"),
        (b"\x30\x02\x02\x00", r"\(OID, value\) pairs"),
        (b"\x30\x00", "is missing"),
        (b"\x30\x0a\x30\x08\x06\x02\x2a\x80\x04\x02\x00\x00", "bad object identifier"),
        (b"\x30\x0a\x30\x08\x06\x02\x80\x01\x04\x02\x00\x00", "non-minimal object identifier"),
    ],
)
def test_the_extension_reader_refuses_bad_der(value: bytes, message: str) -> None:
    with pytest.raises(ChainInvalid, match=message):
        parse_sgx_extension(_leaf_with(value))


def test_the_extension_reader_refuses_duplicates_and_bad_values() -> None:
    fmspc_item = b"\x30\x10\x06\x0a\x2a\x86\x48\x86\xf8\x4d\x01\x0d\x01\x04\x04\x02\x00\x00"
    twice = b"\x30" + bytes([2 * len(fmspc_item)]) + fmspc_item * 2
    with pytest.raises(ChainInvalid, match="twice"):
        parse_sgx_extension(_leaf_with(twice))
    fmspc = REAL_VALUE.index(bytes.fromhex("06 0a 2a864886f84d010d0104")) + 12
    assert REAL_VALUE[fmspc : fmspc + 2] == b"\x04\x06"
    wrong_type = bytearray(REAL_VALUE)
    wrong_type[fmspc] = 0x05  # the FMSPC's OCTET STRING tag
    with pytest.raises(ChainInvalid, match="the FMSPC is not an OCTET STRING of 6 bytes"):
        parse_sgx_extension(_leaf_with(bytes(wrong_type)))
    negative = bytearray(REAL_VALUE)
    comp = REAL_VALUE.index(bytes.fromhex("06 0b 2a864886f84d010d010201")) + 13
    assert negative[comp : comp + 2] == b"\x02\x01"
    negative[comp + 2] = 0x80  # component 1 SVN: INTEGER -128
    with pytest.raises(ChainInvalid, match=r"component .* is not a small non-negative INTEGER"):
        parse_sgx_extension(_leaf_with(bytes(negative)))


def test_flipped_bytes_of_the_extension_are_read_or_refused_never_a_crash() -> None:
    """Every byte of the real extension value, each flipped in its low bit."""
    for position in range(len(REAL_VALUE)):
        value = bytearray(REAL_VALUE)
        value[position] ^= 0x01
        try:
            parse_sgx_extension(_leaf_with(bytes(value)))
        except ChainInvalid as error:
            assert "\n" not in str(error)
