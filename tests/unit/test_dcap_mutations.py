"""Tampered real DCAP quotes and collateral are refused with a typed error, never another exception.

Byte positions, per verifiable sample (SGX v3 against TCB info v3 and v2 collateral, TDX v4, each
at a time inside its window):
* signed region (header || body): every byte, through ``verify`` and through ``verify_with_chain``
  with the chain of the untouched quote;
* quote signature, attestation key, QE auth data: every byte;
* QE report and QE report signature: every 4th byte plus the first and last;
* each certificate of the PCK chain (PEM inside the quote): every 8th byte plus the first and last;
* the collateral's TCB-info and QE-identity signatures: every 4th hex digit (changed to another
  hex digit, so the JSON stays readable), and the signed TCB-info text itself;
* of the SGX samples' collateral (TCB info v3 and v2): the TCB-info and QE-identity texts, the
  TCB signing chain and both CRLs, every 8th character plus the first and last;
* truncation, on every sample: at every structure boundary and at 16 other offsets spread over
  the quote.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.dcap import SgxDcapVerifier, TdxVerifier
from attestation.dcap_quote import HEADER_SIZE, Quote, parse_quote
from attestation.errors import AttestationError, ChainInvalid, EvidenceSignatureInvalid, MalformedEvidence
from tests.unit.dcap_vectors import ALL, SGX_DCAPRS, SGX_QVL, TDX_QVL, VERIFIABLE, Sample, pem_chain


def _verifier(sample: Sample, collateral: str | None = None) -> SgxDcapVerifier | TdxVerifier:
    reference = SGX_QVL if sample.platform == "sgx" else TDX_QVL
    text = collateral or sample.collateral or reference.collateral
    assert text is not None
    return SgxDcapVerifier(text) if sample.platform == "sgx" else TdxVerifier(text)


def _flipped(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0x01
    return bytes(out)


def _sampled(start: int, end: int, step: int) -> list[int]:
    return sorted({*range(start, end, step), start, end - 1})


def _rejection(call: Callable[..., object], *args: Any, **kwargs: Any) -> AttestationError:
    """The typed error ``call(*args, **kwargs)`` raises; any other exception (or none) fails the test."""
    try:
        call(*args, **kwargs)
    except AttestationError as exc:
        assert "\n" not in str(exc)
        return exc
    pytest.fail("tampered input was accepted")


def _regions(quote: Quote, evidence: bytes) -> Iterator[tuple[str, int, int]]:
    signed = len(quote.signed)
    yield "signature", signed + 4, signed + 68
    yield "attestation key", signed + 68, signed + 132
    qe = evidence.index(quote.qe_report)
    yield "QE report", qe, qe + 384
    yield "QE report signature", qe + 384, qe + 448
    auth = evidence.index(quote.qe_auth_data, qe + 450)
    yield "QE auth data", auth, auth + len(quote.qe_auth_data)


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_every_signed_byte_is_covered_by_the_quote_signature(sample: Sample) -> None:
    verifier = _verifier(sample)
    evidence = sample.evidence
    chain = verifier.verify_chain(evidence, sample.at)
    signed = len(parse_quote(evidence).signed)
    for position in range(signed):
        tampered = _flipped(evidence, position)
        direct = _rejection(verifier.verify, tampered, at=sample.at)
        cached = _rejection(verifier.verify_with_chain, tampered, chain, sample.at)
        if position >= HEADER_SIZE:
            # Body bytes: TDX's TCB fields are part of the chain key, everything else is not.
            assert isinstance(direct, EvidenceSignatureInvalid), (position, direct)
            assert isinstance(cached, EvidenceSignatureInvalid | ChainInvalid), (position, cached)
        else:
            assert isinstance(direct, EvidenceSignatureInvalid | MalformedEvidence), (position, direct)
            assert isinstance(cached, ChainInvalid | MalformedEvidence), (position, cached)


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_the_signature_data_fields_are_all_checked(sample: Sample) -> None:
    verifier = _verifier(sample)
    evidence = sample.evidence
    quote = parse_quote(evidence)
    chain = verifier.verify_chain(evidence, sample.at)
    for name, start, end in _regions(quote, evidence):
        step = 4 if name.startswith("QE report") else 1
        for position in _sampled(start, end, step):
            tampered = _flipped(evidence, position)
            error = _rejection(verifier.verify, tampered, at=sample.at)
            if name in ("signature", "attestation key"):
                assert isinstance(error, EvidenceSignatureInvalid), (name, position, error)
            else:
                assert isinstance(error, ChainInvalid), (name, position, error)
            if name != "signature":
                cached = _rejection(verifier.verify_with_chain, tampered, chain, sample.at)
                assert isinstance(cached, ChainInvalid), (name, position, cached)


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_every_pck_certificate_is_checked(sample: Sample) -> None:
    verifier = _verifier(sample)
    evidence = sample.evidence
    certificates = pem_chain(evidence)
    assert len(certificates) == 3
    for index, pem in enumerate(certificates):
        start = evidence.index(pem)
        for position in _sampled(start, start + len(pem), 8):
            tampered = _flipped(evidence, position)
            error = _rejection(verifier.verify, tampered, at=sample.at)
            assert isinstance(error, ChainInvalid | MalformedEvidence), (index, position, error)


def _other_hex_digit(text: str, position: int) -> str:
    digit = int(text[position], 16) ^ 0x1
    return text[:position] + format(digit, "x") + text[position + 1 :]


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
@pytest.mark.parametrize("field", ["tcb_info_signature", "qe_identity_signature"])
def test_the_collateral_signatures_are_checked(sample: Sample, field: str) -> None:
    assert sample.collateral is not None
    document = json.loads(sample.collateral)
    signature = document[field]
    assert len(signature) == 128
    for position in _sampled(0, len(signature), 4):
        tampered = {**document, field: _other_hex_digit(signature, position)}
        verifier = _verifier(sample, json.dumps(tampered))
        error = _rejection(verifier.verify, sample.evidence, at=sample.at)
        assert isinstance(error, ChainInvalid), (field, position, error)


@pytest.mark.parametrize("sample", VERIFIABLE, ids=lambda s: s.name)
def test_the_signed_tcb_info_text_is_checked(sample: Sample) -> None:
    assert sample.collateral is not None
    document = json.loads(sample.collateral)
    tcb_info = json.loads(document["tcb_info"])
    for changed in (
        {**tcb_info, "tcbEvaluationDataNumber": tcb_info["tcbEvaluationDataNumber"] + 1},
        {**tcb_info, "tcbLevels": tcb_info["tcbLevels"][1:]},
    ):
        tampered = {**document, "tcb_info": json.dumps(changed, separators=(",", ":"))}
        verifier = _verifier(sample, json.dumps(tampered))
        error = _rejection(verifier.verify, sample.evidence, at=sample.at)
        assert isinstance(error, ChainInvalid), error


def _pem_ders(text: str) -> list[bytes] | None:
    try:
        return [cert.public_bytes(Encoding.DER) for cert in x509.load_pem_x509_certificates(text.encode())]
    except ValueError:
        return None


def _changed_character(text: str, position: int, hex_text: bool) -> str:
    if hex_text:
        return _other_hex_digit(text, position)
    return text[:position] + chr(ord(text[position]) ^ 0x01) + text[position + 1 :]


@pytest.mark.parametrize("sample", (SGX_QVL, SGX_DCAPRS), ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("field", "hex_text"),
    [
        ("tcb_info", False),
        ("qe_identity", False),
        ("tcb_info_issuer_chain", False),
        ("root_ca_crl", True),
        ("pck_crl", True),
    ],
)
def test_every_changed_byte_of_the_collateral_is_refused(sample: Sample, field: str, hex_text: bool) -> None:
    """Every 8th character of the field's text plus its first and last (hex digits changed to
    another hex digit, other characters in their low bit; JSON escapes what that makes). Collateral
    that can no longer be read at all is a one-line ``ValueError`` when the verifier is built (it
    is configuration, not evidence); all other collateral reaches the appraisal, which refuses it
    with a typed error. The v2 appraisal also requires the chain's root to be the trusted root."""
    assert sample.collateral is not None
    document = json.loads(sample.collateral)
    text = document[field]
    refused = 0
    positions = _sampled(0, len(text), 8)
    if field.endswith("_chain") and sample is SGX_QVL:
        # dcap-qvl checks the TCB signing certificate against the root it is given and ignores
        # the chain's own copy of the root: only the signing certificate is checked there.
        positions = [p for p in positions if p < len(pem_chain(text.encode())[0])]
    for position in positions:
        changed = _changed_character(text, position, hex_text)
        if field.endswith("_chain") and _pem_ders(changed) == _pem_ders(text):
            continue  # e.g. a line break made a vertical tab: whitespace to PEM, the same certificates
        tampered = json.dumps({**document, field: changed})
        try:
            verifier = _verifier(sample, tampered)
        except ValueError as unusable:
            assert "\n" not in str(unusable)
            continue
        _rejection(verifier.verify, sample.evidence, at=sample.at)
        refused += 1
    # Most changes leave the text readable; those must all be refused by the appraisal.
    assert refused >= len(positions) // 2, (refused, len(positions))


def _boundaries(quote: Quote, evidence: bytes) -> set[int]:
    signed = len(quote.signed)
    qe = evidence.index(quote.qe_report)
    auth = evidence.index(quote.qe_auth_data, qe + 450) if quote.qe_auth_data else qe + 450
    cert = evidence.index(quote.cert_data)
    points = {
        0,
        1,
        2,
        HEADER_SIZE - 1,
        HEADER_SIZE,
        HEADER_SIZE + 3,
        signed - 1,
        signed,
        signed + 2,
        signed + 4,
        signed + 68,
        signed + 132,
        signed + 134,
        qe - 1,
        qe,
        qe + 384,
        qe + 448,
        qe + 449,
        auth,
        auth + len(quote.qe_auth_data),
        cert - 6,
        cert - 4,
        cert - 1,
        cert,
        cert + len(quote.cert_data) // 2,
        len(quote.raw) - 1,
    }
    for pem in pem_chain(evidence):
        start = evidence.index(pem)
        points |= {start, start + len(pem) - 1, start + len(pem)}
    return {point for point in points if 0 <= point < len(quote.raw)}


@pytest.mark.parametrize("sample", ALL, ids=lambda s: s.name)
def test_truncation_is_malformed(sample: Sample) -> None:
    evidence = sample.evidence
    quote = parse_quote(evidence)
    verifier = _verifier(sample)
    length = len(quote.raw)
    spread = {length * k // 17 for k in range(1, 17)}
    for cut in sorted(_boundaries(quote, evidence) | spread):
        error = _rejection(verifier.verify, evidence[:cut], at=sample.at)
        assert isinstance(error, MalformedEvidence), (cut, error)
        with pytest.raises(MalformedEvidence):
            verifier.chain_cache_key(evidence[:cut])
