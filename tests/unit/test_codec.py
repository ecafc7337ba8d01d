"""EncryptionCodec and the codec keyring file."""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError

from rekey.codec import (
    ENCODING,
    FORMAT_METADATA,
    INNER_ENCODING_METADATA,
    KEY_ID_METADATA,
    CodecError,
    EncryptionCodec,
    Keyring,
    associated_data,
    codec_keys_path,
    data_converter,
    key_id_for,
    load_or_create_codec_keys,
    rotate_codec_key,
)

SECRET = "wrapped-dek-0123456789abcdef-TOP-SECRET"


@dataclass
class Job:
    key_ref: str
    material: str


def _payload(text: str = SECRET) -> Payload:
    return Payload(metadata={"encoding": b"json/plain", "x-extra": b"kept"}, data=json.dumps(text).encode())


async def test_round_trip_and_wire_format() -> None:
    codec = EncryptionCodec(Keyring.generate())
    original = _payload()
    [encoded] = await codec.encode([original])
    assert encoded.metadata["encoding"] == ENCODING
    assert encoded.metadata[KEY_ID_METADATA] == codec.key_id.encode()
    assert encoded.metadata[FORMAT_METADATA] == b"2"
    assert encoded.metadata[INNER_ENCODING_METADATA] == b"json/plain"
    assert set(encoded.metadata) == {"encoding", KEY_ID_METADATA, FORMAT_METADATA, INNER_ENCODING_METADATA}
    assert SECRET.encode() not in encoded.SerializeToString()
    assert b"x-extra" not in encoded.SerializeToString()  # original metadata is encrypted too
    assert len(encoded.data) == 12 + len(original.SerializeToString()) + 16
    [decoded] = await codec.decode([encoded])
    assert decoded == original


async def test_nonce_is_fresh_per_payload() -> None:
    codec = EncryptionCodec(Keyring.generate())
    first, second = await codec.encode([_payload(), _payload()])
    assert first.data[:12] != second.data[:12]
    assert first.data != second.data


async def test_unencrypted_payload_passes_through() -> None:
    """Only when asked for (reading histories from before encryption; the codec server)."""
    codec = EncryptionCodec(Keyring.generate(), allow_unencrypted=True)
    plain = _payload("from before encryption was enabled")
    [decoded] = await codec.decode([plain])
    assert decoded == plain


@pytest.mark.parametrize("encoding", [b"json/plain", b"binary/null", b"binary/plain", None])
async def test_unencrypted_payload_is_refused_by_default(encoding: bytes | None) -> None:
    """Attack: a forged plain payload (e.g. a signal sent without the codec) is not accepted."""
    codec = EncryptionCodec(Keyring.generate())
    forged = (
        Payload(data=b'"forged"') if encoding is None else Payload(metadata={"encoding": encoding}, data=b"1")
    )
    with pytest.raises(CodecError, match="not encrypted"):
        await codec.decode([forged])


async def test_worker_converter_refuses_forged_plain_payload(tmp_path: Path) -> None:
    """The converter clients and workers use: a plain payload does not decode to a value."""
    converter = data_converter(tmp_path)
    [plain] = await DataConverter.default.encode([Job(key_ref="vault:evil", material="forged")])
    with pytest.raises(CodecError, match="not encrypted"):
        await converter.decode([plain], [Job])
    # ...nor hidden among genuine ones.
    [genuine] = await converter.encode([Job(key_ref="vault:ok", material="real")])
    with pytest.raises(CodecError, match="not encrypted"):
        await converter.decode([genuine, plain], [Job, Job])
    allowing = data_converter(tmp_path, allow_unencrypted=True)
    assert await allowing.decode([plain], [Job]) == [Job(key_ref="vault:evil", material="forged")]


async def test_ciphertext_swapped_between_payloads_with_other_metadata_fails() -> None:
    """Attack: move the data of one encrypted payload into a payload with other metadata."""
    codec = EncryptionCodec(Keyring.generate())
    [as_json, as_null] = await codec.encode([_payload(), Payload(metadata={"encoding": b"binary/null"})])
    assert as_json.metadata != as_null.metadata
    as_null.data, as_json.data = as_json.data, as_null.data
    for swapped in (as_json, as_null):
        with pytest.raises(CodecError, match="failed authentication"):
            await codec.decode([swapped])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (INNER_ENCODING_METADATA, b"binary/null"),
        (INNER_ENCODING_METADATA, None),
        ("x-added", b"1"),
        (FORMAT_METADATA, None),  # downgrade to format 1
    ],
)
async def test_outer_metadata_is_bound(key: str, value: bytes | None) -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    if value is None:
        del encoded.metadata[key]
    else:
        encoded.metadata[key] = value
    with pytest.raises(CodecError, match=r"failed authentication|unexpected metadata"):
        await codec.decode([encoded])


async def test_unknown_format_is_refused() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    encoded.metadata[FORMAT_METADATA] = b"3"
    with pytest.raises(CodecError, match="unknown 'encryption-format'"):
        await codec.decode([encoded])


def _format1(ring: Keyring, payload: Payload) -> Payload:
    """A payload as the format 1 codec wrote it (AAD: the key id only)."""
    nonce = os.urandom(12)
    key_id = ring.current.encode()
    sealed = AESGCM(ring.keys[ring.current]).encrypt(nonce, payload.SerializeToString(), key_id)
    return Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id}, data=nonce + sealed)


async def test_format1_payloads_still_decode() -> None:
    """Histories recorded before format 2 stay readable; tampering with them still fails."""
    ring = Keyring.generate()
    codec = EncryptionCodec(ring)
    old = _format1(ring, _payload())
    assert len(old.data) == 12 + len(_payload().SerializeToString()) + 16
    [decoded] = await codec.decode([old])
    assert decoded == _payload()
    old.metadata["x-added"] = b"1"
    with pytest.raises(CodecError, match="unexpected metadata"):
        await codec.decode([old])
    del old.metadata["x-added"]
    old.data = old.data[:-1] + bytes([old.data[-1] ^ 1])
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([old])


async def test_inner_encoding_must_match_outer() -> None:
    """Even under the right AAD, a decrypted payload whose encoding differs from the label fails."""
    ring = Keyring.generate()
    codec = EncryptionCodec(ring)
    [encoded] = await codec.encode([_payload()])
    # Re-encrypt, as a key holder would, a binary/null payload under a json/plain label.
    nonce = os.urandom(12)
    inner = Payload(metadata={"encoding": b"binary/null"})
    encoded.data = nonce + AESGCM(ring.keys[ring.current]).encrypt(
        nonce, inner.SerializeToString(), associated_data(dict(encoded.metadata))
    )
    with pytest.raises(CodecError, match="does not match"):
        await codec.decode([encoded])


async def test_data_converter_round_trips_values(tmp_path: Path) -> None:
    converter = data_converter(tmp_path)
    job = Job(key_ref="kms://k/1", material=SECRET)
    payloads = await converter.encode([job, 42])
    assert all(p.metadata["encoding"] == ENCODING for p in payloads)
    assert all(SECRET.encode() not in p.SerializeToString() for p in payloads)
    assert await converter.decode(payloads, [Job, int]) == [job, 42]


async def test_data_converter_encrypts_failure_message(tmp_path: Path) -> None:
    converter = data_converter(tmp_path)
    failure = Failure()
    await converter.encode_failure(ApplicationError(f"unwrap failed for {SECRET}"), failure)
    assert SECRET.encode() not in failure.SerializeToString()
    assert failure.message == "Encoded failure"
    decoded = await converter.decode_failure(failure)
    assert SECRET in str(decoded)


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
async def test_tampered_data_is_rejected(where: str) -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    data = bytearray(encoded.data)
    index = {"nonce": 0, "ciphertext": 12, "tag": len(data) - 1}[where]
    data[index] ^= 0x01
    encoded.data = bytes(data)
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([encoded])


async def test_truncated_data_is_rejected() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    encoded.data = encoded.data[:20]
    with pytest.raises(CodecError, match="too short"):
        await codec.decode([encoded])


async def test_unknown_key_id_is_rejected() -> None:
    [encoded] = await EncryptionCodec(Keyring.generate()).encode([_payload()])
    other = EncryptionCodec(Keyring.generate())
    with pytest.raises(CodecError, match="not in the keyring"):
        await other.decode([encoded])


async def test_key_id_is_bound_by_aad() -> None:
    """Relabelling a payload with another known key id fails instead of decrypting."""
    ring = Keyring.generate().with_new_current()
    old_id = next(k for k in ring.keys if k != ring.current)
    codec = EncryptionCodec(ring)
    [encoded] = await codec.encode([_payload()])
    encoded.metadata[KEY_ID_METADATA] = old_id.encode()
    with pytest.raises(CodecError, match="failed authentication"):
        await codec.decode([encoded])


async def test_missing_key_id_is_rejected() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    del encoded.metadata[KEY_ID_METADATA]
    with pytest.raises(CodecError, match="no 'encryption-key-id'"):
        await codec.decode([encoded])


async def test_rotation_old_key_decodes_new_key_encodes(tmp_path: Path) -> None:
    before = load_or_create_codec_keys(tmp_path)
    [old_payload] = await EncryptionCodec(before).encode([_payload("old")])

    after = rotate_codec_key(tmp_path)
    assert after.current != before.current
    assert set(after.keys) == {before.current, after.current}
    assert load_or_create_codec_keys(tmp_path) == after

    codec = EncryptionCodec(after)
    [new_payload] = await codec.encode([_payload("new")])
    assert new_payload.metadata[KEY_ID_METADATA] == after.current.encode()
    assert await codec.decode([old_payload, new_payload]) == [_payload("old"), _payload("new")]
    # A process still holding only the old keyring cannot read the new payloads.
    with pytest.raises(CodecError, match="not in the keyring"):
        await EncryptionCodec(before).decode([new_payload])


def test_keys_file_mode_layout_and_reuse(tmp_path: Path) -> None:
    ring = load_or_create_codec_keys(tmp_path)
    path = codec_keys_path(tmp_path)
    assert path == tmp_path / "codec" / "keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    raw = json.loads(path.read_text())
    assert raw["current"] == ring.current
    assert list(raw["keys"]) == [ring.current]
    assert key_id_for(ring.keys[ring.current]) == ring.current and len(ring.current) == 16
    assert load_or_create_codec_keys(tmp_path) == ring  # loaded, not regenerated
    rotate_codec_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_concurrent_first_use_agrees_on_one_key(tmp_path: Path) -> None:
    results: list[Keyring] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        results.append(load_or_create_codec_keys(tmp_path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.current for r in results}) == 1
    assert load_or_create_codec_keys(tmp_path) == results[0]


def test_world_readable_keys_file_is_refused(tmp_path: Path) -> None:
    load_or_create_codec_keys(tmp_path)
    os.chmod(codec_keys_path(tmp_path), 0o644)
    with pytest.raises(CodecError, match="chmod 600"):
        load_or_create_codec_keys(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"keys": {}}',
        '{"current": "abc", "keys": {}}',
        '{"current": "abc", "keys": {"abc": "!!notbase64"}}',
        '{"current": "abc", "keys": {"abc": "c2hvcnQ="}}',
    ],
)
def test_bad_keyring_json_is_refused(text: str) -> None:
    with pytest.raises(CodecError):
        Keyring.from_json(text)


def test_key_with_wrong_id_is_refused() -> None:
    ring = Keyring.generate()
    with pytest.raises(CodecError, match="does not match its id"):
        Keyring(current="0" * 16, keys={"0" * 16: ring.keys[ring.current]})


def test_keyring_repr_hides_keys() -> None:
    ring = Keyring.generate()
    assert ring.keys[ring.current].hex() not in repr(ring)
    assert repr(ring.keys[ring.current]) not in repr(ring)


def test_default_converter_is_untouched(tmp_path: Path) -> None:
    data_converter(tmp_path)
    assert DataConverter.default.payload_codec is None
