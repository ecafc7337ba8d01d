"""EncryptionCodec and the codec keyring file."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.api.failure.v1 import Failure
from temporalio.converter import ActivitySerializationContext, DataConverter, WorkflowSerializationContext
from temporalio.exceptions import ApplicationError

from rekey.codec import (
    BOUND_AAD_PREFIX,
    ENCODING,
    FORMAT_METADATA,
    INNER_ENCODING_METADATA,
    KEY_ID_METADATA,
    NAMESPACE_METADATA,
    REFUSED_ENCODING,
    SCHEDULED_ID_PREFIXES,
    WORKFLOW_ID_METADATA,
    CodecError,
    EncryptionCodec,
    Keyring,
    associated_data,
    codec_keys_path,
    data_converter,
    key_id_for,
    load_or_create_codec_keys,
    refused_payload,
    rotate_codec_key,
    worker_converter,
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
    encoded.metadata[FORMAT_METADATA] = b"4"
    with pytest.raises(CodecError, match="unknown 'encryption-format'"):
        await codec.decode([encoded])
    encoded.metadata[FORMAT_METADATA] = b"3"  # known now, and a format 2 ciphertext fails as format 3
    with pytest.raises(CodecError, match="failed authentication"):
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


async def test_a_huge_key_id_never_reaches_an_error_or_log_line_whole() -> None:
    # A refused payload's reason is logged by the worker on every replay: attacker-chosen
    # metadata must not make that line a megabyte long.
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.encode([_payload()])
    encoded.metadata["encryption-key-id"] = b"k" * 1_000_000
    with pytest.raises(CodecError, match="malformed") as refused:
        await codec.decode([encoded])
    assert len(str(refused.value)) < 200


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


# --------------------------------------------------------------- format 3: bound to namespace and workflow


def _wf(workflow_id: str, namespace: str = "default") -> WorkflowSerializationContext:
    return WorkflowSerializationContext(namespace=namespace, workflow_id=workflow_id)


def _act(workflow_id: str | None, namespace: str = "default") -> ActivitySerializationContext:
    return ActivitySerializationContext(
        namespace=namespace,
        activity_id="1",
        activity_type="rewrap",
        activity_task_queue="q",
        workflow_id=workflow_id,
        workflow_type=None if workflow_id is None else "RotateKeyWorkflow",
        is_local=False,
    )


async def test_format3_binds_namespace_and_workflow_in_clear() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_wf("rotate:vault:orders")).encode([_payload()])
    assert encoded.metadata[FORMAT_METADATA] == b"3"
    assert encoded.metadata[NAMESPACE_METADATA] == b"default"
    assert encoded.metadata[WORKFLOW_ID_METADATA] == b"rotate:vault:orders"
    assert SECRET.encode() not in encoded.SerializeToString()
    for reader in (
        codec.with_context(_wf("rotate:vault:orders")),
        codec.with_context(_act("rotate:vault:orders")),  # the workflow's activities
        codec,  # no context: a bare client
        codec.for_namespace("default"),  # the codec server, told the namespace by the UI
        codec.for_namespace(None),
    ):
        assert await reader.decode([encoded]) == [_payload()]


@pytest.mark.parametrize(
    ("reader", "message"),
    [
        (
            _wf("rotate:vault:payments"),
            "belongs to workflow 'rotate:vault:orders', not 'rotate:vault:payments'",
        ),
        (_wf("rotate:vault:orders", "other"), "belongs to namespace 'default', not 'other'"),
        (_act("rotate:vault:payments"), "belongs to workflow"),
        (_act(None), "belongs to workflow"),
        (_wf("rotate:vault:orders-2026-12-02T00:33:00Z"), "belongs to workflow"),  # not a schedule id
    ],
)
async def test_format3_payload_copied_elsewhere_is_refused(
    reader: WorkflowSerializationContext | ActivitySerializationContext, message: str
) -> None:
    """Attack: a ciphertext from workflow A's history handed to workflow B (or another namespace)."""
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_wf("rotate:vault:orders")).encode([_payload()])
    with pytest.raises(CodecError, match=re.escape(message)):
        await codec.with_context(reader).decode([encoded])


async def test_codec_server_namespace_check() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_wf("a", "tenant-1")).encode([_payload()])
    with pytest.raises(CodecError, match="belongs to namespace 'tenant-1', not 'tenant-2'"):
        codec.for_namespace("tenant-2").decode_sync([encoded])
    assert codec.for_namespace("tenant-1").decode_sync([encoded]) == [_payload()]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (WORKFLOW_ID_METADATA, b"rotate:vault:payments"),  # rebind to the target workflow
        (WORKFLOW_ID_METADATA, None),
        (NAMESPACE_METADATA, b"other"),
        (FORMAT_METADATA, b"2"),  # downgrade to the unbound format
    ],
)
async def test_format3_binding_cannot_be_rewritten(key: str, value: bytes | None) -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_wf("rotate:vault:orders")).encode([_payload()])
    if value is None:
        del encoded.metadata[key]
    else:
        encoded.metadata[key] = value
    with pytest.raises(CodecError, match=r"failed authentication|has format 3 metadata"):
        await codec.with_context(_wf("rotate:vault:payments")).decode([encoded])
    with pytest.raises(CodecError, match=r"failed authentication|has format 3 metadata"):
        await codec.decode([encoded])


async def test_format3_without_namespace_is_refused() -> None:
    ring = Keyring.generate()
    metadata = {
        "encoding": ENCODING,
        KEY_ID_METADATA: ring.current.encode(),
        FORMAT_METADATA: b"3",
        INNER_ENCODING_METADATA: b"json/plain",
    }
    nonce = os.urandom(12)
    sealed = AESGCM(ring.keys[ring.current]).encrypt(
        nonce, _payload().SerializeToString(), associated_data(metadata, BOUND_AAD_PREFIX)
    )
    forged = Payload(metadata=metadata, data=nonce + sealed)
    with pytest.raises(CodecError, match="no 'encryption-namespace'"):
        await EncryptionCodec(ring).with_context(_wf("a")).decode([forged])


async def test_activity_without_workflow_binds_namespace_only() -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_act(None)).encode([_payload()])
    assert WORKFLOW_ID_METADATA not in encoded.metadata
    assert await codec.with_context(_act(None)).decode([encoded]) == [_payload()]
    with pytest.raises(
        CodecError, match=re.escape("belongs to workflow none (an activity without a workflow), not 'a'")
    ):
        await codec.with_context(_wf("a")).decode([encoded])


def test_scheduled_prefixes_are_the_launchers() -> None:
    from rekey.client.ids import LAUNCH_PREFIX

    assert SCHEDULED_ID_PREFIXES == (LAUNCH_PREFIX,)


@pytest.mark.parametrize(
    ("target", "accepted"),
    [
        ("launch:schedule:rotate:vault:orders", True),
        ("launch:schedule:rotate:vault:orders-2026-12-02T00:33:00Z", True),  # a schedule's run
        ("launch:schedule:rotate:vault:orders-evil", False),
        ("launch:schedule:rotate:vault:orders-2026-12-02T00:33:00Z-2026-12-02T00:33:00Z", False),
        ("launch:schedule:rotate:vault:orders-2026-12-02T00:33:00+01:00", False),
        ("launch:schedule:rotate:vault:payments-2026-12-02T00:33:00Z", False),
    ],
)
async def test_schedule_runs_read_the_input_their_schedule_bound(target: str, accepted: bool) -> None:
    codec = EncryptionCodec(Keyring.generate())
    [encoded] = await codec.with_context(_wf("launch:schedule:rotate:vault:orders")).encode([_payload()])
    reader = codec.with_context(_wf(target))
    if accepted:
        assert await reader.decode([encoded]) == [_payload()]
    else:
        with pytest.raises(CodecError, match="belongs to workflow"):
            await reader.decode([encoded])


@pytest.mark.parametrize("fmt", [1, 2])
async def test_old_formats_decode_in_context_unless_min_format_refuses(fmt: int) -> None:
    """Histories written before format 3 stay readable by default; ``min_format=3`` refuses them."""
    ring = Keyring.generate()
    old = _format1(ring, _payload()) if fmt == 1 else (await EncryptionCodec(ring).encode([_payload()]))[0]
    assert old.metadata.get(FORMAT_METADATA, b"1") == str(fmt).encode()
    assert await EncryptionCodec(ring).with_context(_wf("any")).decode([old]) == [_payload()]
    assert await EncryptionCodec(ring, min_format=fmt).with_context(_wf("any")).decode([old]) == [_payload()]
    for strict in (
        EncryptionCodec(ring, min_format=3),
        EncryptionCodec(ring, min_format=3).with_context(_wf("a")),
    ):
        with pytest.raises(CodecError, match=f"is format {fmt}, not bound to its workflow; refused"):
            await strict.decode([old])
    [new] = await EncryptionCodec(ring, min_format=3).with_context(_wf("a")).encode([_payload()])
    assert await EncryptionCodec(ring, min_format=3).with_context(_wf("a")).decode([new]) == [_payload()]


def test_min_format_must_be_known() -> None:
    with pytest.raises(CodecError, match="min_format must be one of"):
        EncryptionCodec(Keyring.generate(), min_format=4)


async def test_data_converter_binds_values_to_the_context(tmp_path: Path) -> None:
    """The converter Temporal gives a context (``DataConverter.with_context``) passes it on."""
    converter = data_converter(tmp_path)
    [payload] = await converter.with_context(_wf("wf-a")).encode([Job("vault:orders", SECRET)])
    assert payload.metadata[WORKFLOW_ID_METADATA] == b"wf-a"
    assert await converter.with_context(_wf("wf-a")).decode([payload], [Job]) == [Job("vault:orders", SECRET)]
    with pytest.raises(CodecError, match="belongs to workflow 'wf-a', not 'wf-b'"):
        await converter.with_context(_wf("wf-b")).decode([payload], [Job])
    strict = data_converter(tmp_path, min_format=3)
    [unbound] = await converter.encode([Job("vault:orders", SECRET)])
    with pytest.raises(CodecError, match="is format 2"):
        await strict.with_context(_wf("wf-a")).decode([unbound], [Job])


def test_setting_codec_min_format(tmp_path: Path) -> None:
    from rekey.client import data_converter as client_converter
    from rekey.config import ConfigError, load_settings

    home = tmp_path / "home"
    assert load_settings(home, environ={}).codec_min_format == 1
    (home / "rekey.toml").write_text("codec_min_format = 3\n")
    settings = load_settings(home, environ={})
    assert settings.codec_min_format == 3
    codec = client_converter(settings).payload_codec
    assert isinstance(codec, EncryptionCodec)
    old = _format1(load_or_create_codec_keys(home), _payload())
    with pytest.raises(CodecError, match="refused because codec_min_format is 3"):
        codec.with_context(_wf("a")).decode_sync([old])
    assert load_settings(home, environ={"REKEY_CODEC_MIN_FORMAT": "2"}).codec_min_format == 2
    with pytest.raises(ConfigError, match="codec_min_format must be 1, 2 or 3"):
        load_settings(home, environ={"REKEY_CODEC_MIN_FORMAT": "0"})


# ------------------------------------------- a worker's codec: refused payloads become a stand-in


async def _refused_kinds(codec: EncryptionCodec) -> dict[str, Payload]:
    """Payloads workflow B's worker must refuse: plain, copied from A, tampered, unknown key,
    format 2 under min_format 3 (built by the caller's codec options)."""
    [from_a] = await codec.with_context(_wf("rotate:vault:orders")).encode([_payload()])
    tampered = Payload()
    tampered.CopyFrom(from_a)
    tampered.data = from_a.data[:-1] + bytes([from_a.data[-1] ^ 1])
    [other_key] = await EncryptionCodec(Keyring.generate()).with_context(_wf("b")).encode([_payload()])
    return {
        "plain": _payload("forged"),
        "copied": from_a,
        "tampered": tampered,
        "unknown key": other_key,
        "refused encoding": refused_payload(),
    }


async def test_worker_codec_decodes_refused_payloads_to_the_stand_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack (issue 12 review finding B): a copied ciphertext or a plain payload sent to
    workflow B. The worker's codec does not raise (which would fail every workflow task of B) but
    hands on a stand-in no converter knows, and logs why without any of the data."""
    codec = EncryptionCodec(Keyring.generate())
    worker = codec.for_worker().with_context(_wf("b"))
    assert worker.drops_refused and not codec.drops_refused
    for kind, payload in (await _refused_kinds(codec)).items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="rekey.codec"):
            [decoded] = await worker.decode([payload])
        assert decoded == refused_payload(), kind
        assert decoded.metadata["encoding"] == REFUSED_ENCODING and decoded.data == b""
        [record] = caplog.records
        assert "refused" in record.getMessage() and "'b'" in record.getMessage(), kind
        assert SECRET not in record.getMessage() and "forged" not in record.getMessage()
        with pytest.raises(CodecError):  # a client's (and the codec server's) codec still raises
            await codec.with_context(_wf("b")).decode([payload])
    # what it accepts is unchanged
    [own] = await worker.encode([_payload()])
    assert await worker.decode([own]) == [_payload()]


async def test_worker_codec_under_min_format_3_drops_format2() -> None:
    codec = EncryptionCodec(Keyring.generate(), min_format=3)
    [format2] = await codec.encode([_payload()])  # no context: what /encode writes
    [decoded] = await codec.for_worker().with_context(_wf("b")).decode([format2])
    assert decoded == refused_payload()


async def test_no_converter_turns_the_stand_in_into_a_value(tmp_path: Path) -> None:
    converter = worker_converter(data_converter(tmp_path))
    with pytest.raises(KeyError, match="binary/rekey-refused"):
        converter.payload_converter.from_payloads([refused_payload()], [Job])
    with pytest.raises(KeyError):
        converter.payload_converter.from_payloads([refused_payload()], None)
    with pytest.raises(KeyError):  # DataConverter.decode: the activity path, codec then converter
        await converter.with_context(_act("b")).decode([_payload("forged")], [Job])


def test_worker_converter_needs_rekeys_codec_and_no_unencrypted(tmp_path: Path) -> None:
    client = data_converter(tmp_path)
    worker = worker_converter(client)
    assert isinstance(worker.payload_codec, EncryptionCodec) and worker.payload_codec.drops_refused
    assert isinstance(client.payload_codec, EncryptionCodec) and not client.payload_codec.drops_refused
    assert worker.failure_converter_class is client.failure_converter_class
    with pytest.raises(CodecError, match="payload codec"):
        worker_converter(DataConverter.default)
    with pytest.raises(CodecError, match="unencrypted"):
        worker_converter(data_converter(tmp_path, allow_unencrypted=True))
