"""NitroVerifier: the real AWS Nitro Enclaves documents in vectors/nitro/ verify at the times
their PROVENANCE.md gives, with the claims it states; everything else is a typed error."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.claims import Claims
from attestation.errors import (
    ChainInvalid,
    EvidenceSignatureInvalid,
    MalformedEvidence,
    NonceMismatch,
)
from attestation.nitro import (
    PINNED_ROOT_SHA256,
    NitroVerifier,
    VerifiedNitroChain,
    nitro_recipient_conditions,
    pinned_root_pem,
)
from attestation.platform import PlatformVerifier
from attestation.policy import parse_policy
from attestation.token import ResultSigner
from attestation.verifier import CachingPlatformVerifier, Verifier, expected_report_data
from tests.fixtures.nitro import PCR0, NitroTestCA

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "vectors" / "nitro"
ZERO_PCR = "00" * 48


def _ms(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, UTC)


@dataclass(frozen=True)
class Sample:
    file: str
    timestamp: int  # ms, the document's own and the verification time
    window: tuple[str, str]  # the chain's common validity window (PROVENANCE.md)
    module_id: str
    pcr0: str
    pcr8: str
    debug: bool
    user_data: bytes | None
    nonce_bytes: int | None
    public_key: bytes | None

    @property
    def at(self) -> datetime:
        return _ms(self.timestamp)

    def evidence(self) -> bytes:
        return (VECTORS / self.file).read_bytes()


ONES = b"\x01" * 1024
SAMPLES = {
    "blocky": Sample(
        "blocky_nitro_attestation.b64",
        1725719859545,
        ("2024-09-07T14:37:36+00:00", "2024-09-07T17:37:39+00:00"),
        "i-0a22e5c5f24d22174-enc0191cceb4289903f",
        "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
        ZERO_PCR,
        False,
        ONES,
        1024,
        ONES,
    ),
    "blocky-debug": Sample(
        "blocky_nitro_attestation_debug.b64",
        1725719886508,
        ("2024-09-07T14:38:03+00:00", "2024-09-07T17:38:06+00:00"),
        "i-0a22e5c5f24d22174-enc0191ccebaf8feaba",
        ZERO_PCR,
        ZERO_PCR,
        True,
        ONES,
        1024,
        ONES,
    ),
    "evervault-pcr8": Sample(
        "evervault_nondebug_doc_18-1-23.derived.cbor",
        1674047239280,
        ("2023-01-18T13:07:13+00:00", "2023-01-18T16:07:16+00:00"),
        "i-0ec0e572c8263d8ff-enc0185c4fd382eeb25",
        "d265a83faa7b4fa0d73b82b6d06253e894445922937d0ee5a74fe4891da9817611a71e71b98e5329232902de3cf419af",
        "97c5395a83c0d6a04d53ff962663c714c178c24500bf97f78456ed3721d922cf3f940614da4bb90107c439bc4a1443ca",
        False,
        None,  # a P-384 SPKI, checked below
        256,
        None,
    ),
    "evervault-ga-debug": Sample(
        "evervault_valid_attestation_doc.b64",
        1695049410860,
        ("2023-09-18T14:37:09+00:00", "2023-09-18T17:37:12+00:00"),
        "i-0918f6c55e3b61d89-enc018aa8b8e2285d13",
        ZERO_PCR,
        ZERO_PCR,
        True,
        None,  # the SPKI of evervault_valid_certificate.der, checked below
        256,
        None,
    ),
    "evervault-beta": Sample(
        "evervault_beta_valid_attestation_doc.cbor",
        1665651482136,
        ("2022-10-13T08:57:59+00:00", "2022-10-13T11:58:02+00:00"),
        "i-020b6af9246d90e92-enc0183d09086c24190",
        "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
        "",  # PROVENANCE states no PCR8 for this one
        False,
        None,
        256,
        None,
    ),
}
STATED_PCRS = {
    "blocky": {
        1: "0343b056cd8485ca7890ddd833476d78460aed2aa161548e4e26bedf321726696257d623e8805f3f605946b3d8b0c6aa",
        2: "d5dcbdea0aa39c802f9d55ced2ea6e4d74ecec5f08fe40c508882639c9090642669106a062a3e24ee2805a3024b9b75c",
        3: ZERO_PCR,
        4: "45706d7b621e4620a332e147a5ddb000b049f73d47d3e61f6b03d2069152d4df6a4a786ad1c10102b955799a9dc96b44",
    },
    "blocky-debug": {
        1: ZERO_PCR,
        2: ZERO_PCR,
        4: "45706d7b621e4620a332e147a5ddb000b049f73d47d3e61f6b03d2069152d4df6a4a786ad1c10102b955799a9dc96b44",
    },
    "evervault-pcr8": {
        1: "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
        2: "e4f634d24ad83b7f6e49fe283bafdb220f6252fb4a278a858e19d15b7cd0f263b9168ed0bacefb4444266df9f9a77f24",
    },
    "evervault-ga-debug": {1: ZERO_PCR, 2: ZERO_PCR},
    "evervault-beta": {
        1: "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
        2: "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a",
    },
}


@pytest.fixture(scope="module")
def verifier() -> NitroVerifier:
    return NitroVerifier()


def _verify(verifier: NitroVerifier, name: str, at: datetime | None = None) -> Claims:
    sample = SAMPLES[name]
    return verifier.verify(sample.evidence(), at=at or sample.at)


# -- the pinned root -----------------------------------------------------------------------------


def test_the_pinned_root_is_the_published_aws_root_and_the_sample_root() -> None:
    pem = pinned_root_pem()
    assert pem == (VECTORS / "aws_nitro_root_g1.pem").read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    assert der == (VECTORS / "aws_nitro_root_g1.derived.der").read_bytes()
    assert hashlib.sha256(der).hexdigest() == PINNED_ROOT_SHA256
    assert PINNED_ROOT_SHA256 == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"


def test_the_verifier_implements_the_protocols(verifier: NitroVerifier) -> None:
    plain: PlatformVerifier = verifier  # mypy checks both protocols here
    checked: CachingPlatformVerifier = verifier
    assert plain.platform == checked.platform == "nitro"
    assert "root_sha256=641a0321a3e244ef" in repr(verifier)


# -- every sample verifies at its time with the stated claims ------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_verifies_with_the_stated_claims(verifier: NitroVerifier, name: str) -> None:
    sample = SAMPLES[name]
    claims = _verify(verifier, name)
    assert claims.platform == "nitro"
    assert claims.measurement == sample.pcr0
    assert claims.detail("pcr0") == sample.pcr0
    assert claims.signer.startswith(sample.pcr8)
    assert claims.signer == claims.detail("pcr8")
    assert claims.debug is sample.debug
    assert claims.detail("module_id") == sample.module_id
    assert claims.detail("digest") == "SHA384"
    assert claims.evidence_time == sample.at
    assert (claims.product_id, claims.svn, claims.tcb_status) == (0, 0, "UpToDate")
    for index, value in STATED_PCRS[name].items():
        assert claims.detail(f"pcr{index}") == value
    assert sorted(int(k[3:]) for k, _ in claims.details if k.startswith("pcr")) == list(range(16))
    nonce = claims.detail("nonce")
    assert nonce is not None and len(bytes.fromhex(nonce)) == sample.nonce_bytes
    assert claims.detail("public_key") == (sample.public_key.hex() if sample.public_key else None)
    if sample.user_data is not None:
        assert claims.detail("user_data") == sample.user_data.hex()
        assert claims.report_data == sample.user_data.hex()  # longer than 64 bytes: reported whole
    raw = sample.evidence()
    cose = base64.b64decode(raw) if sample.file.endswith(".b64") else raw
    assert claims.evidence_digest == hashlib.sha256(cose).hexdigest()


def test_the_evervault_ga_user_data_is_the_tls_certificate_key(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "evervault-ga-debug")
    certificate = x509.load_der_x509_certificate((VECTORS / "evervault_valid_certificate.der").read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert claims.detail("user_data") == spki.hex()
    # 91 bytes: longer than report data, so reported whole (the core's binding check refuses it).
    assert claims.report_data == spki.hex()


def test_the_evervault_pcr8_user_data_is_a_p384_key(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "evervault-pcr8")
    user_data = claims.detail("user_data")
    assert user_data is not None and len(user_data) == 240
    key = serialization.load_der_public_key(bytes.fromhex(user_data))
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def test_absent_user_data_is_zero_report_data(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "evervault-beta")
    assert claims.report_data == "00" * 64
    assert claims.detail("user_data") is None


@pytest.mark.parametrize(
    ("name", "at"),
    [
        # The upstream tests' own fixed or faked times (PROVENANCE.md), all inside the windows.
        ("evervault-pcr8", datetime(2023, 1, 18, 15, 15, tzinfo=UTC)),
        ("evervault-ga-debug", datetime(2023, 9, 18, 17, 18, tzinfo=UTC)),
    ],
)
def test_samples_verify_at_the_upstream_times(verifier: NitroVerifier, name: str, at: datetime) -> None:
    assert _verify(verifier, name, at).measurement == SAMPLES[name].pcr0


# -- time ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_the_chain_window_edges(verifier: NitroVerifier, name: str) -> None:
    start, end = (datetime.fromisoformat(edge) for edge in SAMPLES[name].window)
    assert _verify(verifier, name, start).platform == "nitro"
    assert _verify(verifier, name, end).platform == "nitro"
    for outside in (
        start - timedelta(seconds=1),
        end + timedelta(seconds=1),
        datetime(2026, 11, 27, tzinfo=UTC),
    ):
        with pytest.raises(ChainInvalid, match="not valid at"):
            _verify(verifier, name, outside)


def test_a_naive_time_is_a_programming_error(verifier: NitroVerifier) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(verifier, "blocky", datetime(2024, 9, 7, 15, 0))


# -- trust ---------------------------------------------------------------------------------------------


def test_another_root_is_refused() -> None:
    ca = NitroTestCA.create(SAMPLES["blocky"].at)
    with pytest.raises(ChainInvalid, match="does not start at the trusted AWS Nitro root"):
        _verify(NitroVerifier(root_pem=ca.root_pem), "blocky")


def test_a_test_chain_is_refused_by_the_pinned_root(verifier: NitroVerifier) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ca = NitroTestCA.create(at)
    document = ca.document(at)
    assert NitroVerifier(root_pem=ca.root_pem).verify(document, at=at).measurement == PCR0.hex()
    with pytest.raises(ChainInvalid):
        verifier.verify(document, at=at)


def test_a_document_signed_by_another_key_is_refused() -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ca, other = NitroTestCA.create(at), NitroTestCA.create(at)
    forged = NitroTestCA(ca.root_pem, ca.root_der, ca.intermediate_der, ca.leaf_der, other.leaf_key)
    with pytest.raises(EvidenceSignatureInvalid):
        NitroVerifier(root_pem=ca.root_pem).verify(forged.document(at), at=at)


def test_the_root_pem_must_be_a_self_signed_ca() -> None:
    ca = NitroTestCA.create(datetime(2026, 11, 27, tzinfo=UTC))
    leaf_pem = x509.load_der_x509_certificate(ca.leaf_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(ValueError, match="self-signed CA"):
        NitroVerifier(root_pem=leaf_pem)
    with pytest.raises(ValueError, match="self-signed CA"):
        NitroVerifier(root_pem=b"not a certificate")


def test_a_cabundle_that_skips_the_intermediate_is_refused() -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ca = NitroTestCA.create(at)
    document = ca.document(at, cabundle=[ca.root_der])
    with pytest.raises(ChainInvalid, match="not issued by"):
        NitroVerifier(root_pem=ca.root_pem).verify(document, at=at)


def test_a_ca_certificate_cannot_sign_documents() -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ca = NitroTestCA.create(at)
    # The intermediate as the signing certificate (its key is not the leaf key, but the chain
    # check refuses it first).
    document = ca.document(at, certificate=ca.intermediate_der, cabundle=[ca.root_der])
    with pytest.raises(ChainInvalid, match="end-entity"):
        NitroVerifier(root_pem=ca.root_pem).verify(document, at=at)


# -- debug and policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["blocky-debug", "evervault-ga-debug"])
def test_debug_documents_are_refused_by_a_policy_that_forbids_debug(
    verifier: NitroVerifier, name: str
) -> None:
    claims = _verify(verifier, name)
    assert claims.debug is True
    strict = parse_policy(
        {"id": "p", "rules": [{"platform": "nitro", "measurements": [ZERO_PCR], "nonce_required": False}]}
    )
    decision = strict.evaluate(claims, now=SAMPLES[name].at, nonce_checked=False)
    assert not decision.allowed
    assert any("debug enclave not allowed" in reason for reason in decision.reasons)
    lax = parse_policy(
        {
            "id": "p",
            "rules": [
                {
                    "platform": "nitro",
                    "measurements": [ZERO_PCR],
                    "debug_allowed": True,
                    "nonce_required": False,
                }
            ],
        }
    )
    assert lax.evaluate(claims, now=SAMPLES[name].at, nonce_checked=False).allowed


def test_a_production_document_passes_the_strict_policy(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "blocky")
    strict = parse_policy(
        {
            "id": "p",
            "rules": [{"platform": "nitro", "measurements": [claims.measurement], "nonce_required": False}],
        }
    )
    assert strict.evaluate(claims, now=SAMPLES["blocky"].at, nonce_checked=False).allowed


def test_any_zero_pcr0_to_2_is_debug() -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    ca = NitroTestCA.create(at)
    verifier = NitroVerifier(root_pem=ca.root_pem)
    for index in (0, 1, 2):
        pcrs = {i: (PCR0 if i == 0 else bytes([i]) * 48) for i in range(16)}
        pcrs[index] = bytes(48)
        assert verifier.verify(ca.document(at, pcrs=pcrs), at=at).debug is True
    assert verifier.verify(ca.document(at), at=at).debug is False


# -- encodings -------------------------------------------------------------------------------------


def test_raw_and_base64_forms_give_the_same_claims(verifier: NitroVerifier) -> None:
    sample = SAMPLES["blocky"]
    cose = base64.b64decode(sample.evidence())
    assert cose[0] == 0x84
    from_b64 = verifier.verify(sample.evidence(), at=sample.at)
    assert verifier.verify(cose, at=sample.at) == from_b64
    urlsafe = base64.urlsafe_b64encode(cose).rstrip(b"=")
    wrapped = b"\n".join(urlsafe[i : i + 76] for i in range(0, len(urlsafe), 76)) + b"\n"
    assert verifier.verify(wrapped, at=sample.at) == from_b64


def test_a_cose_tag_18_is_accepted(verifier: NitroVerifier) -> None:
    sample = SAMPLES["evervault-beta"]
    tagged = b"\xd2" + sample.evidence()
    assert verifier.verify(tagged, at=sample.at).measurement == sample.pcr0


def test_trailing_bytes_are_refused(verifier: NitroVerifier) -> None:
    sample = SAMPLES["evervault-beta"]
    with pytest.raises(MalformedEvidence, match="trailing bytes"):
        verifier.verify(sample.evidence() + b"\x00", at=sample.at)


@pytest.mark.parametrize(
    "evidence",
    [
        b"",
        b"\x00",
        b"not base64 at all!",
        base64.b64encode(b"\x01\x02\x03"),
        b"\x84" + b"\xff" * 10,
        b"\x81" * 100_000,  # too large, and deeply nested
        b"\x84" * 5000,  # deep nesting within the size cap
        bytes.fromhex("845b7fffffffffffffff"),  # a byte string claiming 2^63 bytes
        bytes.fromhex("9f40a04040ff"),  # indefinite length
        bytes.fromhex("84") + bytes.fromhex("c11a514b67b0") * 4,  # tags instead of byte strings
        bytes.fromhex("d9d9f7") + bytes.fromhex("8440a04040"),  # another tag
        bytes.fromhex("8440a04040"),  # empty fields
        bytes.fromhex("83404040"),  # three items
    ],
)
def test_hostile_envelopes_are_malformed(verifier: NitroVerifier, evidence: bytes) -> None:
    with pytest.raises(MalformedEvidence):
        verifier.verify(evidence, at=SAMPLES["blocky"].at)
    with pytest.raises(MalformedEvidence):
        verifier.chain_cache_key(evidence)


def test_non_bytes_evidence_is_malformed(verifier: NitroVerifier) -> None:
    with pytest.raises(MalformedEvidence):
        verifier.verify("hEShATgioFkR", at=SAMPLES["blocky"].at)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def test_ca() -> NitroTestCA:
    return NitroTestCA.create(datetime(2026, 11, 27, 12, tzinfo=UTC))


HOSTILE_FIELDS = [
    {"module_id": 7},
    {"module_id": ""},
    {"module_id": "x" * 300},
    {"digest": "SHA256"},
    {"timestamp": "now"},
    {"timestamp": -1},
    {"timestamp": 1 << 70},
    {"timestamp": 253402300800000},  # year 10000: past what datetime holds
    {"timestamp": True},
    {"pcrs": [b"\x00" * 48]},
    {"pcrs": {}},
    {"pcrs": {0: b"\x00" * 32}},
    {"pcrs": {1: b"\x01" * 48}},  # no PCR0
    {"pcrs": {"0": b"\x00" * 48}},
    {"pcrs": {32: b"\x00" * 48, 0: b"\x00" * 48}},
    {"pcrs": {i: b"\x00" * 48 for i in range(40)}},
    {"certificate": None},
    {"certificate": "DER"},
    {"certificate": b"\x30" * 5000},
    {"cabundle": []},
    {"cabundle": b"\x30"},
    {"cabundle": [b"\x30"] * 9},
    {"cabundle": ["root"]},
    {"user_data": b"\x00" * 1025},
    {"user_data": "text"},
    {"nonce": 12},
    {"public_key": [b"\x00"]},
]


@pytest.mark.parametrize("override", HOSTILE_FIELDS, ids=[repr(h)[:40] for h in HOSTILE_FIELDS])
def test_signed_documents_with_hostile_fields_are_malformed(
    test_ca: NitroTestCA, override: dict[str, object]
) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    document = test_ca.document(at, **override)
    with pytest.raises(MalformedEvidence):
        NitroVerifier(root_pem=test_ca.root_pem).verify(document, at=at)


@pytest.mark.parametrize(
    "payload",
    [
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({1: "module"}),
        b"\xa1" * 50,  # deep nesting
        bytes.fromhex("a2") + cbor2.dumps("digest") + cbor2.dumps("SHA384") * 2 + b"",
        bytes.fromhex("bf6664696765737466534841333834ff"),  # indefinite map
        cbor2.dumps({"digest": "SHA384"})[:-1],  # truncated
    ],
)
def test_signed_hostile_payloads_are_malformed(test_ca: NitroTestCA, payload: bytes) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    with pytest.raises(MalformedEvidence):
        NitroVerifier(root_pem=test_ca.root_pem).verify(test_ca.sign(payload), at=at)


def test_duplicate_payload_keys_are_malformed(test_ca: NitroTestCA) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    body = cbor2.dumps(test_ca.payload(at))
    # Append a second "digest" entry and bump the map's item count (a 1-byte head: 0xa9 -> 0xaa).
    assert body[0] == 0xA9
    duplicated = b"\xaa" + body[1:] + cbor2.dumps("digest") + cbor2.dumps("SHA384")
    with pytest.raises(MalformedEvidence):
        NitroVerifier(root_pem=test_ca.root_pem).verify(test_ca.sign(duplicated), at=at)


@pytest.mark.parametrize(
    "protected",
    [b"\xa1\x01\x26", b"\xa0", b"\xa2\x01\x38\x22\x02\x81\x01", b"\x40", b"\xa1\x01"],
    ids=["ES256", "empty", "crit", "bstr", "truncated"],
)
def test_a_protected_header_other_than_es384_is_refused(test_ca: NitroTestCA, protected: bytes) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    document = test_ca.sign(test_ca.payload(at), protected=protected)
    with pytest.raises(MalformedEvidence, match="protected header"):
        NitroVerifier(root_pem=test_ca.root_pem).verify(document, at=at)


# -- the chain cache protocol --------------------------------------------------------------------


def test_chain_cache_key_is_shared_by_documents_of_one_signing_certificate(test_ca: NitroTestCA) -> None:
    at = datetime(2026, 11, 27, 12, tzinfo=UTC)
    verifier = NitroVerifier(root_pem=test_ca.root_pem)
    first, second = test_ca.document(at, nonce=b"1"), test_ca.document(at, nonce=b"2")
    assert verifier.chain_cache_key(first) == verifier.chain_cache_key(second)
    assert verifier.chain_cache_key(first) != NitroVerifier().chain_cache_key(SAMPLES["blocky"].evidence())
    chain = verifier.verify_chain(first, at)
    assert isinstance(chain, VerifiedNitroChain)
    assert chain.not_after == at + timedelta(hours=3)
    assert verifier.verify_with_chain(second, chain, at).detail("nonce") == b"2".hex()


def test_verify_with_chain_refuses_a_chain_of_other_certificates(verifier: NitroVerifier) -> None:
    blocky, debug = SAMPLES["blocky"], SAMPLES["blocky-debug"]
    assert verifier.chain_cache_key(blocky.evidence()) != verifier.chain_cache_key(debug.evidence())
    chain = verifier.verify_chain(blocky.evidence(), blocky.at)
    with pytest.raises(ChainInvalid, match="other certificates"):
        verifier.verify_with_chain(debug.evidence(), chain, debug.at)
    with pytest.raises(ChainInvalid, match="other certificates"):
        verifier.verify_with_chain(blocky.evidence(), object(), blocky.at)


def test_verify_with_chain_refuses_a_time_outside_the_chain(verifier: NitroVerifier) -> None:
    sample = SAMPLES["blocky"]
    chain = verifier.verify_chain(sample.evidence(), sample.at)
    assert chain.not_before == datetime.fromisoformat(sample.window[0])
    assert chain.not_after == datetime.fromisoformat(sample.window[1])
    with pytest.raises(ChainInvalid):
        verifier.verify_with_chain(sample.evidence(), chain, chain.not_after + timedelta(seconds=1))


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def test_the_core_issues_a_token_and_reuses_the_chain(test_ca: NitroTestCA) -> None:
    """A document whose user_data is SHA-256(nonce || key), as a rekey enclave binds it."""
    at = datetime(2026, 11, 27, 12, 30, tzinfo=UTC)
    key = b"-----enclave public key-----"
    policy = parse_policy(
        {"id": "nitro-release", "rules": [{"platform": "nitro", "measurements": [PCR0.hex()]}]}
    )
    signer = ResultSigner.generate()
    async with Verifier(
        {"nitro": NitroVerifier(root_pem=test_ca.root_pem)}, signer, clock=_Clock(at)
    ) as core:
        for nonce in (b"first nonce", b"second nonce"):
            binding = expected_report_data(nonce, key)[:32]
            document = test_ca.document(at, user_data=binding, nonce=nonce)
            token = await core.verify(
                document,
                platform="nitro",
                expected_nonce=nonce,
                policy=policy,
                audience="kms",
                cnf_public_key=key,
            )
            result = signer.verify(token, audience="kms", policy_id="nitro-release", now=at)
            assert result.claims.platform == "nitro"
            assert result.claims.measurement == PCR0.hex()
            assert result.claims.nonce == nonce.hex()
        stats = core.stats()
    assert stats["verified"] == 2
    assert stats["chain_cache_misses"] == 1
    assert stats["chain_cache_hits"] == 1


async def test_the_core_caches_a_real_chain_and_refuses_its_unbound_user_data(
    verifier: NitroVerifier,
) -> None:
    """The real documents bind 1024 bytes of 0x01, not SHA-256(nonce || key): the core's binding
    check refuses them, after the chain (cached on the second call) and signature verified."""
    sample = SAMPLES["blocky"]
    policy = parse_policy({"id": "p", "rules": [{"platform": "nitro", "measurements": [sample.pcr0]}]})
    async with Verifier({"nitro": verifier}, ResultSigner.generate(), clock=_Clock(sample.at)) as core:
        for _ in range(2):
            with pytest.raises(NonceMismatch, match="1024 bytes"):
                await core.verify(
                    sample.evidence(),
                    platform="nitro",
                    expected_nonce=b"n",
                    policy=policy,
                    audience="kms",
                    cnf_public_key=b"k",
                )
        stats = core.stats()
    assert (stats["chain_cache_misses"], stats["chain_cache_hits"], stats["platform_verifications"]) == (
        1,
        1,
        2,
    )


# -- KMS recipient conditions ----------------------------------------------------------------------


def test_recipient_conditions_pin_the_image_and_the_signed_pcrs(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "evervault-pcr8")
    pcrs = STATED_PCRS["evervault-pcr8"]
    assert nitro_recipient_conditions(claims) == {
        "StringEqualsIgnoreCase": {
            "kms:RecipientAttestation:ImageSha384": SAMPLES["evervault-pcr8"].pcr0,
            "kms:RecipientAttestation:PCR1": pcrs[1],
            "kms:RecipientAttestation:PCR2": pcrs[2],
            "kms:RecipientAttestation:PCR8": SAMPLES["evervault-pcr8"].pcr8,
        }
    }


def test_recipient_conditions_skip_a_zero_pcr8_and_take_asked_pcrs(verifier: NitroVerifier) -> None:
    claims = _verify(verifier, "blocky")
    conditions = nitro_recipient_conditions(claims)["StringEqualsIgnoreCase"]
    assert sorted(conditions) == [
        "kms:RecipientAttestation:ImageSha384",
        "kms:RecipientAttestation:PCR1",
        "kms:RecipientAttestation:PCR2",
    ]
    with_instance = nitro_recipient_conditions(claims, pcrs=(4,))["StringEqualsIgnoreCase"]
    assert with_instance["kms:RecipientAttestation:PCR4"] == STATED_PCRS["blocky"][4]
    with pytest.raises(ValueError, match="PCR0 is ImageSha384"):
        nitro_recipient_conditions(claims, pcrs=(0,))


def test_recipient_conditions_refuse_debug_and_other_platforms(verifier: NitroVerifier) -> None:
    with pytest.raises(ValueError, match="debug"):
        nitro_recipient_conditions(_verify(verifier, "blocky-debug"))
    claims = _verify(verifier, "blocky")
    with pytest.raises(ValueError, match="not nitro"):
        nitro_recipient_conditions(replace(claims, platform="sgx"))
