"""Every changed byte of a real Nitro document is a typed error, never a pass or a crash.

No sampling: every byte is changed, which is fast because changes outside the certificates are
checked against the original's verified chain (see ``_refused``). On the evervault document with
a signed image (PCR8): every byte of the COSE envelope heads, the protected header and the
signature (three masks each); every payload byte (three masks on CBOR item heads, one elsewhere);
every byte of each cabundle certificate and of the signing certificate (three masks on DER tag
and length bytes), checked with ``verify_chain`` alone so that the chain check, not the document
signature, must catch it. The signature of a second document (blocky) too.
Truncation: at every CBOR item boundary of the envelope and payload and at every
certificate's start and end.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest

from attestation.errors import AttestationError, MalformedEvidence
from attestation.nitro import NitroVerifier

VECTORS = Path(__file__).resolve().parents[2] / "vectors" / "nitro"
DOCUMENT = (VECTORS / "evervault_nondebug_doc_18-1-23.derived.cbor").read_bytes()
AT = datetime.fromtimestamp(1674047239280 / 1000, UTC)
BLOCKY = base64.b64decode((VECTORS / "blocky_nitro_attestation.b64").read_bytes())
BLOCKY_AT = datetime.fromtimestamp(1725719859545 / 1000, UTC)


def _argument(data: bytes, pos: int) -> tuple[int, int]:
    """(value, head length) of the CBOR head at ``pos``."""
    info = data[pos] & 0x1F
    if info < 24:
        return info, 1
    size = 1 << (info - 24)
    return int.from_bytes(data[pos + 1 : pos + 1 + size], "big"), 1 + size


def cbor_items(data: bytes, pos: int = 0) -> Iterator[tuple[int, int, int]]:
    """(start, head length, end) of every item in the definite-length CBOR item at ``pos``,
    depth first, the item itself first."""
    major = data[pos] >> 5
    value, head = _argument(data, pos)
    children: list[tuple[int, int, int]] = []
    end = pos + head
    if major in (2, 3):
        end += value
    elif major in (4, 5, 6):
        count = {4: value, 5: 2 * value, 6: 1}[major]
        for _ in range(count):
            items = list(cbor_items(data, end))
            children += items
            end = items[0][2]
    yield pos, head, end
    yield from children


def der_heads(data: bytes, pos: int = 0, end: int | None = None) -> Iterator[int]:
    """Offsets of every DER tag and length byte in ``data[pos:end]``."""
    end = len(data) if end is None else end
    while pos < end:
        tag = data[pos]
        length = data[pos + 1]
        head = 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(data[pos + 2 : pos + 2 + size], "big")
            head += size
        yield from range(pos, pos + head)
        if tag & 0x20:  # constructed: walk inside
            yield from der_heads(data, pos + head, pos + head + length)
        pos += head + length


def _envelope(document: bytes) -> dict[str, tuple[int, int]]:
    """Content ranges (after each head) of the four COSE_Sign1 fields."""
    ranges = {}
    pos = 1  # after the array head 0x84
    for name in ("protected", "unprotected", "payload", "signature"):
        start, head, end = next(cbor_items(document, pos))
        ranges[name] = (start + head, end)
        pos = end
    return ranges


RANGES = _envelope(DOCUMENT)
PAYLOAD_AT, PAYLOAD_END = RANGES["payload"]
PAYLOAD = DOCUMENT[PAYLOAD_AT:PAYLOAD_END]


def _flip(data: bytes, position: int, mask: int = 0x01) -> bytes:
    return data[:position] + bytes([data[position] ^ mask]) + data[position + 1 :]


@pytest.fixture(scope="module")
def verifier() -> NitroVerifier:
    verifier = NitroVerifier()
    assert verifier.verify(DOCUMENT, at=AT).signer.startswith("97c5395a")
    assert verifier.verify(BLOCKY, at=BLOCKY_AT).measurement
    return verifier


def _refused(verifier: NitroVerifier, document: bytes, at: datetime = AT) -> bool:
    """``verify`` is ``verify_chain`` then ``verify_with_chain``. A change outside the
    certificates leaves the chain as it was, so check it against the original document's
    verified chain (the path the core takes on a cache hit: one ECDSA check instead of five);
    a change inside them must fail ``verify_with_chain``'s chain comparison, and fails
    ``verify_chain`` in test_certificate_bytes_fail_the_chain_check."""
    original = DOCUMENT if at == AT else BLOCKY
    chain = _chains(verifier)[original]
    try:
        verifier.verify_with_chain(document, chain, at)
    except AttestationError:
        return True
    return False


_CHAINS: dict[bytes, object] = {}


def _chains(verifier: NitroVerifier) -> dict[bytes, object]:
    if not _CHAINS:
        _CHAINS[DOCUMENT] = verifier.verify_chain(DOCUMENT, AT)
        _CHAINS[BLOCKY] = verifier.verify_chain(BLOCKY, BLOCKY_AT)
    return _CHAINS


def test_the_walkers_see_the_real_layout() -> None:
    assert DOCUMENT[0] == 0x84
    assert RANGES["signature"][1] - RANGES["signature"][0] == 96
    assert RANGES["signature"][1] == len(DOCUMENT)
    assert RANGES["unprotected"] == (RANGES["unprotected"][0], RANGES["unprotected"][0])  # empty map
    payload_items = list(cbor_items(PAYLOAD))
    assert payload_items[0][2] == len(PAYLOAD)
    assert len(payload_items) == 55  # the map, 9 keys, 9 values, 16 PCR pairs, 4 cabundle entries


def test_every_envelope_and_protected_header_byte(verifier: NitroVerifier) -> None:
    positions = [*range(PAYLOAD_AT), *range(*RANGES["signature"]), RANGES["signature"][0] - 1]
    for position in sorted(set(positions)):
        for mask in (0x01, 0x80, 0xFF):
            assert _refused(verifier, _flip(DOCUMENT, position, mask)), (
                f"byte {position} ^ {mask:#x} verified"
            )


def test_every_signature_byte_of_a_second_document(verifier: NitroVerifier) -> None:
    ranges = _envelope(BLOCKY)
    for position in range(*ranges["signature"]):
        assert _refused(verifier, _flip(BLOCKY, position), BLOCKY_AT), f"signature byte {position} verified"


def test_every_payload_byte(verifier: NitroVerifier) -> None:
    heads = {start + i for start, head, _ in cbor_items(PAYLOAD) for i in range(head)}
    positions = range(len(PAYLOAD))
    for offset in positions:
        masks = (0x01, 0x20, 0xFF) if offset in heads else (0x01,)
        for mask in masks:
            mutated = _flip(DOCUMENT, PAYLOAD_AT + offset, mask)
            assert _refused(verifier, mutated), f"payload byte {offset} ^ {mask:#x} verified"


def _certificates() -> list[tuple[str, int, int]]:
    """(name, start, end) of each certificate's DER in DOCUMENT."""
    fields = cbor2.loads(PAYLOAD)
    found = []
    for index, der in enumerate([*fields["cabundle"], fields["certificate"]]):
        start = DOCUMENT.index(der)
        name = f"cabundle[{index}]" if index < len(fields["cabundle"]) else "certificate"
        found.append((name, start, start + len(der)))
    return found


CERTIFICATES = _certificates()


@pytest.mark.parametrize(("name", "start", "end"), CERTIFICATES, ids=[c[0] for c in CERTIFICATES])
def test_certificate_bytes_fail_the_chain_check(
    verifier: NitroVerifier, name: str, start: int, end: int
) -> None:
    der = DOCUMENT[start:end]
    heads = set(der_heads(der))
    positions = range(len(der))
    for offset in positions:
        for mask in (0x01, 0x80, 0xFF) if offset in heads else (0x01,):
            mutated = _flip(DOCUMENT, start + offset, mask)
            try:
                verifier.verify_chain(mutated, AT)
            except AttestationError:
                continue
            pytest.fail(f"{name} byte {offset} ^ {mask:#x} changed and the chain still verified")


def test_truncation_at_every_boundary(verifier: NitroVerifier) -> None:
    boundaries = {start for start, _, _ in cbor_items(DOCUMENT)}
    boundaries |= {end for _, _, end in cbor_items(DOCUMENT)}
    boundaries |= {PAYLOAD_AT + start for start, _, _ in cbor_items(PAYLOAD)}
    boundaries |= {PAYLOAD_AT + end for _, _, end in cbor_items(PAYLOAD)}
    boundaries |= {edge for _, start, end in CERTIFICATES for edge in (start, end)}
    boundaries |= {len(DOCUMENT) - 1}
    boundaries.discard(len(DOCUMENT))
    assert len(boundaries) > 60
    for cut in sorted(boundaries):
        with pytest.raises(MalformedEvidence):
            verifier.verify(DOCUMENT[:cut], at=AT)


def test_base64_truncation_and_garbage(verifier: NitroVerifier) -> None:
    text = base64.b64encode(BLOCKY)
    for cut in (1, 4, 100, len(text) // 2, len(text) - 4, len(text) - 1):
        with pytest.raises(MalformedEvidence):
            verifier.verify(text[:cut], at=BLOCKY_AT)
    with pytest.raises(MalformedEvidence):
        verifier.verify(text[:100] + b"*" + text[101:], at=BLOCKY_AT)
