"""Sealed-blob envelope v1: round trips, canonical layout, and typed errors on every bad byte."""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sealing import envelope
from sealing.envelope import SealingPolicy, open_blob, parse, rewrap, seal
from sealing.errors import (
    SealedBlobError,
    TamperedBlob,
    TruncatedBlob,
    UnknownKeyVersion,
    UnsupportedFormat,
)
from sealing.keywrap import LocalKeyWrapper, WrappedKey

FIXED_TIME = datetime(2026, 11, 27, 12, 30, 45, 123000, tzinfo=UTC)
FIXED_ID = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")


@pytest.fixture(scope="module")
def wrapper() -> LocalKeyWrapper:
    return LocalKeyWrapper("vault:orders")


def _seal(wrapper: LocalKeyWrapper, data: bytes = b"enclave state") -> bytes:
    return seal(
        data,
        wrapper,
        namespace="payments",
        name="ledger-key",
        generation="gen-1",
        blob_id=FIXED_ID,
        now=FIXED_TIME,
    )


def test_round_trip_and_header_fields(wrapper: LocalKeyWrapper) -> None:
    blob = _seal(wrapper)
    assert open_blob(blob, wrapper) == b"enclave state"
    parsed = parse(blob)
    assert parsed.header.blob_id == FIXED_ID
    assert parsed.header.namespace == "payments"
    assert parsed.header.name == "ledger-key"
    assert parsed.header.key_ref == "vault:orders"
    assert parsed.header.generation == "gen-1"
    assert parsed.header.policy is SealingPolicy.KMS
    assert parsed.header.created_at == FIXED_TIME
    assert parsed.key_version == wrapper.primary_version
    assert b"enclave state" not in blob


def test_layout_matches_the_documented_offsets(wrapper: LocalKeyWrapper) -> None:
    blob = _seal(wrapper, b"x" * 10)
    magic, version, flags, header_len = struct.unpack(">4sBBH", blob[:8])
    assert (magic, version, flags) == (b"RKSB", 1, 0)
    header = blob[8 : 8 + header_len]
    # First field: tag 0x01, length 16, the blob id.
    assert header[:3] == b"\x01\x00\x10" and header[3:19] == FIXED_ID.bytes
    slot = 8 + header_len
    key_version, wrapped_len = struct.unpack(">IH", blob[slot : slot + 6])
    assert key_version == wrapper.primary_version
    wrapped = blob[slot + 6 : slot + 6 + wrapped_len]
    assert wrapped.startswith(b"local:v%d:" % key_version)
    body = slot + 6 + wrapped_len
    (body_len,) = struct.unpack(">I", blob[body + 12 : body + 16])
    assert body_len == 10 + 16  # plaintext + GCM tag
    assert len(blob) == body + 16 + body_len


class RecordingWrapper:
    """LocalKeyWrapper that keeps the DEKs it wraps, so a test can recompute a blob's body."""

    def __init__(self) -> None:
        self.inner = LocalKeyWrapper("vault:orders")
        self.deks: list[bytes] = []

    @property
    def key_ref(self) -> str:
        return self.inner.key_ref

    def wrap(self, dek: bytes) -> WrappedKey:
        self.deks.append(dek)
        return self.inner.wrap(dek)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self.inner.unwrap(wrapped)

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        return self.inner.rewrap(wrapped)

    def version_of(self, wrapped: bytes) -> int:
        return self.inner.version_of(wrapped)


@pytest.mark.parametrize("size", [0, 1, 15, 4096, 65_537, 1 << 20])
def test_every_byte_of_a_sealed_blob_is_accounted_for(size: int) -> None:
    """No byte of the output buffer is left as it was allocated: the blob is exactly its parts,
    each recomputed here from the inputs, the DEK and the nonce. Freed buffers full of a marker
    are left behind first, so stale memory would show if any byte were not written."""
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    wrapper = RecordingWrapper()
    blobs = []
    for _ in range(2):
        for _ in range(4):
            freed = bytearray(b"\xa5") * (size + 512)
            del freed
        blobs.append(bytes(_seal(wrapper, data)))  # type: ignore[arg-type]
    first, second = (parse(blob) for blob in blobs)
    assert first.aad == second.aad  # the same inputs give the same header, byte for byte
    assert first.aad == struct.pack(">4sBBH", b"RKSB", 1, 0, len(first.aad) - 8) + first.header.encode()
    for blob, parsed, dek in zip(blobs, (first, second), wrapper.deks, strict=True):
        body = AESGCM(dek).encrypt(parsed.nonce, data, parsed.aad)
        expected = b"".join(
            (
                parsed.aad,
                struct.pack(">IH", parsed.key_version, len(parsed.wrapped_dek)),
                parsed.wrapped_dek,
                parsed.nonce,
                struct.pack(">I", len(body)),
                body,
            )
        )
        assert blob == expected
        assert wrapper.unwrap(parsed.wrapped_dek) == dek
        assert open_blob(blob, wrapper) == data  # type: ignore[arg-type]
    assert first.nonce != second.nonce and wrapper.deks[0] != wrapper.deks[1]


def test_creation_time_is_kept_to_the_exact_millisecond(wrapper: LocalKeyWrapper) -> None:
    """Past 2038 a float timestamp * 1000 can land just below the millisecond; the header must
    still say the millisecond it was given."""
    for when in (FIXED_TIME, datetime(2038, 8, 19, 8, 59, 13, 719000, tzinfo=UTC)):
        blob = seal(b"x", wrapper, namespace="n", name="x", generation="g", now=when)
        assert parse(blob).header.created_at == when
    sub_millisecond = datetime(2026, 11, 27, 12, 30, 45, 123999, tzinfo=UTC)
    blob = seal(b"x", wrapper, namespace="n", name="x", generation="g", now=sub_millisecond)
    assert parse(blob).header.created_at == FIXED_TIME  # truncated, not rounded


def test_empty_and_large_bodies(wrapper: LocalKeyWrapper) -> None:
    for data in (b"", bytes(range(256)) * 4096):
        assert open_blob(_seal(wrapper, data), wrapper) == data


def test_every_header_byte_is_authenticated(wrapper: LocalKeyWrapper) -> None:
    blob = _seal(wrapper)
    header_end = 8 + struct.unpack(">H", blob[6:8])[0]
    for offset in range(header_end):
        tampered = bytearray(blob)
        tampered[offset] ^= 0x01
        with pytest.raises(SealedBlobError):
            open_blob(bytes(tampered), wrapper)


def test_header_rewritten_consistently_still_fails(wrapper: LocalKeyWrapper) -> None:
    """Re-encoding a valid header with another name (lengths all consistent) fails the tag."""
    blob = _seal(wrapper)
    forged = blob.replace(b"ledger-key", b"ledger-kez")
    assert len(forged) == len(blob)
    with pytest.raises(TamperedBlob, match="failed authentication"):
        open_blob(forged, wrapper)


def test_rewrap_changes_only_the_key_slot() -> None:
    wrapper = LocalKeyWrapper("vault:orders")
    blob = _seal(wrapper)
    wrapper.rotate()
    moved = rewrap(blob, wrapper)
    before, after = parse(blob), parse(moved)
    assert (before.key_version, after.key_version) == (1, 2)
    assert before.aad == after.aad and bytes(before.ciphertext) == bytes(after.ciphertext)
    assert open_blob(moved, wrapper) == b"enclave state"
    wrapper.disable_below(2)
    with pytest.raises(UnknownKeyVersion):
        open_blob(blob, wrapper)
    assert open_blob(moved, wrapper) == b"enclave state"


def test_key_slot_splice_equals_a_full_rewrap() -> None:
    """The sweep's fast path (frame check + slot splice, no header decode) gives the same
    blob a full parse + re-serialise would, and refuses what parse refuses."""
    wrapper = LocalKeyWrapper("vault:orders")
    blob = bytes(_seal(wrapper, b"x" * 1000))
    slot = envelope.key_slot(blob)
    assert (slot.key_version, slot.wrapped_dek) == (1, parse(blob).wrapped_dek)
    wrapper.rotate()
    rewrapped = wrapper.rewrap(slot.wrapped_dek)
    spliced = envelope.replace_key_slot(blob, slot, rewrapped)
    assert spliced == parse(blob).with_key_slot(rewrapped).to_bytes()
    assert open_blob(spliced, wrapper) == b"x" * 1000
    for broken in (blob[:-1], b"XXXX" + blob[4:], blob + b"\0"):
        with pytest.raises(SealedBlobError):
            envelope.key_slot(broken)
    with pytest.raises(envelope.InvalidWrappedKey):
        envelope.replace_key_slot(blob, slot, type(rewrapped)(b"", 2))


def test_key_slot_from_a_head_read() -> None:
    """A sweep reads only the first bytes of a blob: the slot is found (and the framing checked
    against the full length) once the head reaches the body; a shorter head says so (None)."""
    wrapper = LocalKeyWrapper("vault:orders")
    blob = bytes(_seal(wrapper, b"y" * 5000))
    whole = envelope.key_slot(blob)
    body_at = whole.end + 12 + 4
    for n in (body_at, body_at + 1, 2048, len(blob)):
        assert envelope.key_slot_in_head(blob[:n], len(blob)) == whole
    for n in (whole.start + 5, whole.end, body_at - 1):
        assert envelope.key_slot_in_head(blob[:n], len(blob)) is None
    with pytest.raises(TamperedBlob):  # the stored length disagrees with the body length field
        envelope.key_slot_in_head(blob[:2048], len(blob) + 1)
    with pytest.raises(TruncatedBlob):
        envelope.key_slot_in_head(blob[:2048], len(blob) - 1)
    with pytest.raises(UnsupportedFormat):
        envelope.key_slot_in_head(b"XXXX" + blob[4:2048], len(blob))
    wrapper.rotate()
    rewrapped = wrapper.rewrap(whole.wrapped_dek)
    prefix = envelope.slot_prefix(blob[:2048], whole, rewrapped)
    assert prefix + blob[whole.end :] == envelope.replace_key_slot(blob, whole, rewrapped)
    assert open_blob(prefix + blob[whole.end :], wrapper) == b"y" * 5000


def test_header_from_a_head_read() -> None:
    """A put reads only the first `MAX_HEAD_BYTES` of the blob it replaces: they hold the header
    (framing checked against the full length, as ``parse`` does); a head ending before the body
    starts is a caller's error."""
    wrapper = LocalKeyWrapper("vault:orders")
    blob = bytes(
        seal(
            b"z" * (2 * envelope.MAX_HEAD_BYTES),
            wrapper,
            namespace="n" * 1000,
            name="s",
            generation="g",
            version=7,
        )
    )
    header = parse(blob).header
    assert header.version == 7
    for n in (envelope.MAX_HEAD_BYTES, len(blob)):
        assert envelope.header_in_head(blob[:n], len(blob)) == header
    small = _seal(wrapper)
    assert envelope.header_in_head(small, len(small)) == parse(small).header
    with pytest.raises(ValueError, match="ends before its body"):
        envelope.header_in_head(blob[:1100], len(blob))
    with pytest.raises(TamperedBlob):
        envelope.header_in_head(blob[: envelope.MAX_HEAD_BYTES], len(blob) + 1)
    with pytest.raises(TruncatedBlob):
        envelope.header_in_head(blob[: envelope.MAX_HEAD_BYTES], len(blob) - 1)
    # The largest header and wrapped DEK the length fields allow still end within the head.
    widest = b"RKSB\x01\x00\xff\xff" + b"\x01" * 0xFFFF + struct.pack(">IH", 1, 0xFFFF) + b"\x02" * 0xFFFF
    widest += b"\x00" * 12 + struct.pack(">I", 16) + b"\x00" * 16
    assert len(widest) - 16 == envelope.MAX_HEAD_BYTES
    with pytest.raises(SealedBlobError):  # reached the header, which does not decode
        envelope.header_in_head(widest[: envelope.MAX_HEAD_BYTES], len(widest))


def test_key_slot_version_must_match_the_wrapped_dek() -> None:
    wrapper = LocalKeyWrapper("vault:orders")
    wrapper.rotate()
    blob = bytearray(_seal(wrapper))
    slot = 8 + struct.unpack(">H", blob[6:8])[0]
    struct.pack_into(">I", blob, slot, 1)  # claim version 1; wrapped DEK says 2
    with pytest.raises(TamperedBlob, match="key slot says version 1"):
        open_blob(bytes(blob), wrapper)


def test_wrong_magic_version_and_flags(wrapper: LocalKeyWrapper) -> None:
    blob = _seal(wrapper)
    with pytest.raises(UnsupportedFormat, match="bad magic"):
        open_blob(b"PK\x03\x04" + blob[4:], wrapper)
    with pytest.raises(UnsupportedFormat, match="version 2"):
        open_blob(blob[:4] + b"\x02" + blob[5:], wrapper)
    with pytest.raises(UnsupportedFormat, match="flags"):
        open_blob(blob[:5] + b"\x80" + blob[6:], wrapper)
    with pytest.raises(TruncatedBlob):
        open_blob(b"", wrapper)
    with pytest.raises(TruncatedBlob):
        open_blob(b"RK", wrapper)


def test_unknown_critical_field_is_unsupported_but_extension_is_skipped(
    wrapper: LocalKeyWrapper,
) -> None:
    """A newer writer's extension field (tag >= 0x80) is authenticated and ignored."""
    dek_blob = parse(_seal(wrapper))
    # 0x09 is the blob version (known); 0x0a is the first critical tag this build does not know.
    for tag, expected in ((0x0A, UnsupportedFormat), (0x7F, UnsupportedFormat), (0x90, TamperedBlob)):
        header = dek_blob.aad[8:] + struct.pack(">BH", tag, 3) + b"abc"
        aad = struct.pack(">4sBBH", b"RKSB", 1, 0, len(header)) + header
        forged = envelope.SealedBlob(
            dek_blob.header,
            dek_blob.key_version,
            dek_blob.wrapped_dek,
            dek_blob.nonce,
            dek_blob.ciphertext,
            aad,
        ).to_bytes()
        # The extension parses; only the tag check (AAD changed) fails it.
        with pytest.raises(expected):
            open_blob(forged, wrapper)


def test_blob_version_is_in_the_authenticated_header(wrapper: LocalKeyWrapper) -> None:
    """Every seal writes tag 0x09 (u64) as the header's last field; changing it fails the tag."""
    blob = seal(b"v", wrapper, namespace="ns", name="n", generation="g", version=7)
    parsed = parse(blob)
    assert parsed.header.version == 7
    assert parsed.aad.endswith(b"\x09\x00\x08" + (7).to_bytes(8, "big"))
    assert parsed.aad == struct.pack(">4sBBH", b"RKSB", 1, 0, len(parsed.aad) - 8) + parsed.header.encode()
    assert parse(_seal(wrapper)).header.version == 1  # the default for a fresh blob
    at = len(parsed.aad) - 1
    forged = bytearray(blob)
    forged[at] = 6  # version 7 -> 6: a rolled-back version must not authenticate
    assert parse(forged).header.version == 6
    with pytest.raises(TamperedBlob, match="failed authentication"):
        open_blob(forged, wrapper)
    for bad in (0, -1, 1 << 64):
        with pytest.raises(ValueError, match="blob version"):
            seal(b"v", wrapper, namespace="ns", name="n", generation="g", version=bad)


def test_blob_without_a_version_reads_as_version_0(wrapper: LocalKeyWrapper) -> None:
    """A blob sealed before tag 0x09 existed (built here byte for byte) opens, as version 0;
    an explicit version 0 is not canonical and is refused."""
    dek = bytes(range(32))
    wrapped = wrapper.wrap(dek)
    old_header = parse(_seal(wrapper)).header._replace(version=0)
    header = old_header.encode()
    assert b"\x09\x00\x08" not in header[-11:]
    aad = struct.pack(">4sBBH", b"RKSB", 1, 0, len(header)) + header
    nonce = bytes(12)
    body = AESGCM(dek).encrypt(nonce, b"legacy", aad)
    legacy = envelope.SealedBlob(
        old_header, wrapped.key_version, wrapped.ciphertext, nonce, body, aad
    ).to_bytes()
    assert parse(legacy).header.version == 0
    assert open_blob(legacy, wrapper) == b"legacy"
    # A re-wrap of the legacy blob keeps it at version 0 (and its header bytes).
    assert parse(rewrap(legacy, wrapper)).aad == aad
    zero = header + b"\x09\x00\x08" + bytes(8)
    aad0 = struct.pack(">4sBBH", b"RKSB", 1, 0, len(zero)) + zero
    explicit = envelope.SealedBlob(
        old_header,
        wrapped.key_version,
        wrapped.ciphertext,
        nonce,
        AESGCM(dek).encrypt(nonce, b"x", aad0),
        aad0,
    ).to_bytes()
    with pytest.raises(TamperedBlob, match="version 0"):
        open_blob(explicit, wrapper)


def test_trailing_bytes_are_refused(wrapper: LocalKeyWrapper) -> None:
    with pytest.raises(TamperedBlob, match="trailing"):
        open_blob(_seal(wrapper) + b"\x00", wrapper)


def test_repr_shows_no_body(wrapper: LocalKeyWrapper) -> None:
    text = repr(parse(_seal(wrapper, b"S3CRET-PAYLOAD")))
    assert "S3CRET" not in text and "body bytes" in text


def test_seal_refuses_empty_names(wrapper: LocalKeyWrapper) -> None:
    with pytest.raises(ValueError, match="name must not be empty"):
        seal(b"x", wrapper, namespace="ns", name="", generation="g")


TYPED = (TruncatedBlob, UnsupportedFormat, TamperedBlob, UnknownKeyVersion)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_truncation_or_byte_change_raises_a_typed_error(data: st.DataObject) -> None:
    wrapper = _HYPO_WRAPPER
    plaintext = data.draw(st.binary(max_size=64), label="plaintext")
    blob = seal(plaintext, wrapper, namespace="ns", name="state", generation="gen-1")
    mutation = data.draw(st.sampled_from(["truncate", "flip", "set", "insert", "delete"]))
    mutated = bytearray(blob)
    if mutation == "truncate":
        mutated = mutated[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        offset = data.draw(st.integers(0, len(blob) - 1), label="offset")
        if mutation == "flip":
            mutated[offset] ^= data.draw(st.integers(1, 255), label="mask")
        elif mutation == "set":
            value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[offset]), label="value")
            mutated[offset] = value
        elif mutation == "insert":
            mutated.insert(offset, data.draw(st.integers(0, 255), label="value"))
        else:
            del mutated[offset]
    assert bytes(mutated) != blob
    try:
        result = open_blob(bytes(mutated), wrapper)
    except TYPED:
        return
    pytest.fail(f"a {mutation} of a valid blob returned {len(result)} bytes instead of an error")


_HYPO_WRAPPER = LocalKeyWrapper("vault:hypothesis")
_HYPO_WRAPPER.rotate()


def test_tee_policy_carries_a_key_request(wrapper: LocalKeyWrapper) -> None:
    blob = seal(
        b"x",
        wrapper,
        namespace="ns",
        name="n",
        generation="g",
        policy=SealingPolicy.TEE_MRSIGNER,
        key_request=b"\x03\x00\x02" + b"\x00" * 16,
    )
    header = parse(blob).header
    assert header.policy is SealingPolicy.TEE_MRSIGNER and header.key_request.startswith(b"\x03\x00\x02")
    assert open_blob(blob, wrapper) == b"x"
    with pytest.raises(ValueError, match="key request"):
        seal(b"x", wrapper, namespace="ns", name="n", generation="g", policy=SealingPolicy.TEE_MRENCLAVE)
    with pytest.raises(ValueError, match="key request"):
        seal(b"x", wrapper, namespace="ns", name="n", generation="g", key_request=b"\x01")


def _verdict(fn: Any) -> object:
    try:
        return fn()
    except SealedBlobError as exc:
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_head_read_agrees_with_the_whole_blob_on_any_mutation(data: st.DataObject) -> None:
    """key_slot_in_head's fast path accepts exactly what the full framing check accepts: for a
    mutated blob and any head length, it gives the whole blob's slot or error, or None (the
    head ends too early)."""
    blob = bytearray(
        seal(data.draw(st.binary(max_size=40)), _HYPO_WRAPPER, namespace="n", name="s", generation="g")
    )
    for _ in range(data.draw(st.integers(0, 3))):
        offset = data.draw(st.integers(0, len(blob) - 1))
        blob[offset] = data.draw(st.integers(0, 255))
    blob = blob[: data.draw(st.integers(len(blob) - 4, len(blob)))]
    whole = _verdict(lambda: envelope.key_slot(bytes(blob)))
    head = data.draw(st.integers(0, len(blob)))
    assert _verdict(lambda: envelope.key_slot_in_head(bytes(blob[:head]), len(blob))) in (whole, None)
    assert _verdict(lambda: envelope.key_slot_in_head(bytes(blob), len(blob))) == whole
    assert _verdict(lambda: envelope.header_in_head(bytes(blob), len(blob))) == _verdict(
        lambda: parse(bytes(blob)).header
    )
