"""Sealed-blob envelope, format version 1 (specified byte by byte in docs/sealed-blob-format.md).

    prefix     magic "RKSB" | version 0x01 | flags 0x00 | header length (u16)
    header     TLV fields: blob id, namespace, name, key ref, generation, policy, created,
               [key request], blob version
    key slot   key version (u32) | wrapped DEK length (u16) | wrapped DEK
    body       nonce (12) | body length (u32) | AES-256-GCM ciphertext with 16-byte tag

The body is encrypted under a fresh 256-bit DEK with prefix + header as associated data, so
changing any of those bytes fails authentication. The key slot sits outside the associated
data on purpose: a rotation re-wraps the DEK at the KMS (Transit ``rewrap``, KMS
``ReEncrypt``) and swaps the slot without ever holding the plaintext DEK or touching the
body. The slot is still bound: the wrapped DEK is itself authenticated ciphertext that names
its version, the slot's version must equal that name, and a DEK from any other wrapped key
fails the body's tag.

The header's blob version (tag 0x09) counts the values a name has held: every seal writes one
(``sealing.state`` chooses it, one above the last), a re-wrap keeps it, and a blob sealed before
the field existed reads as version 0. Since it is authenticated, a row restored from a backup
carries its old version, which ``sealing.state`` compares with a checkpoint kept outside the store.
"""

from __future__ import annotations

import enum
import os
import struct
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealing.errors import (
    InvalidWrappedKey,
    TamperedBlob,
    TruncatedBlob,
    UnsupportedFormat,
)
from sealing.keywrap import DEK_BYTES, KeyWrapper, WrappedKey

MAGIC = b"RKSB"
FORMAT_VERSION = 1
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_TEXT_FIELD = 1024
MAX_WRAPPED_DEK = 8192
MAX_BODY = 0xFFFF_FFFF - TAG_BYTES

_PREFIX = struct.Struct(">4sBBH")  # magic, version, flags, header length
_TLV = struct.Struct(">BH")  # tag, length
_SLOT = struct.Struct(">IH")  # key version, wrapped DEK length
_BODY_LEN = struct.Struct(">I")
_U64 = struct.Struct(">Q")

MAX_HEAD_BYTES = _PREFIX.size + 0xFFFF + _SLOT.size + 0xFFFF + NONCE_BYTES + _BODY_LEN.size
"""The most bytes a blob's prefix, header, key slot, nonce and body length can take (each
length field is 16 bits): the first this many bytes of a blob always hold its header."""


class SealingPolicy(enum.IntEnum):
    """What the DEK is bound to. v1 writes KMS; the TEE policies come with hardware sealing."""

    KMS = 1
    TEE_MRENCLAVE = 2
    TEE_MRSIGNER = 3


class Tag(enum.IntEnum):
    """Header field tags. Tags below 0x80 are critical: a reader that does not know one refuses
    the blob. Tags 0x80 and up are extensions a reader may skip (they are still authenticated)."""

    BLOB_ID = 0x01
    NAMESPACE = 0x02
    NAME = 0x03
    KEY_REF = 0x04
    GENERATION = 0x05
    POLICY = 0x06
    CREATED_AT = 0x07
    KEY_REQUEST = 0x08  # present exactly when the policy is a TEE policy
    BLOB_VERSION = 0x09  # u64, >= 1; absent (version 0) only in blobs sealed before it existed


_FIRST_EXTENSION_TAG = 0x80


class BlobHeader(NamedTuple):
    """The authenticated header. ``created_at`` is kept to the millisecond.

    (Header and blob are named tuples, not dataclasses: parsing sits on the unseal path and
    a frozen dataclass costs several times more to build.)"""

    blob_id: uuid.UUID
    namespace: str
    name: str
    key_ref: str
    generation: str
    policy: SealingPolicy
    created_at: datetime
    key_request: bytes = b""  # TEE sealing: how to re-derive the sealing key (opaque here)
    version: int = 0  # the blob version; 0 = sealed before the field existed (no tag 0x09)

    def encode(self) -> bytes:
        """Canonical encoding: every field once, in ascending tag order (version 0: no tag 0x09)."""
        return _encode_header(
            self.blob_id.bytes,
            self.namespace,
            self.name,
            self.key_ref,
            self.generation,
            self.policy,
            _millis(self.created_at),
            self.key_request,
            self.version,
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def _millis(when: datetime) -> int:
    """Milliseconds since the epoch, exactly (a float timestamp * 1000 is sometimes 1 ms short)."""
    if when.tzinfo is None:
        when = when.astimezone()  # a naive time is local time, as datetime.timestamp() reads it
    return (when - _EPOCH) // _ONE_MS


def _text(value: str, label: str) -> bytes:
    raw = value.encode("utf-8")
    if not raw:
        raise ValueError(f"{label} must not be empty")
    if len(raw) > MAX_TEXT_FIELD:
        raise ValueError(f"{label} is longer than {MAX_TEXT_FIELD} bytes")
    return raw


# Plain ints, not Tag members: the header is encoded and decoded for every blob.
_BLOB_ID, _NAMESPACE, _NAME = int(Tag.BLOB_ID), int(Tag.NAMESPACE), int(Tag.NAME)
_KEY_REF, _GENERATION, _POLICY = int(Tag.KEY_REF), int(Tag.GENERATION), int(Tag.POLICY)
_CREATED_AT, _KEY_REQUEST = int(Tag.CREATED_AT), int(Tag.KEY_REQUEST)
_BLOB_VERSION = int(Tag.BLOB_VERSION)
_TEXT_TAG_IDS = (_NAMESPACE, _NAME, _KEY_REF, _GENERATION)
# The TLV heads of the fixed-size fields never change.
_BLOB_ID_HEAD = _TLV.pack(Tag.BLOB_ID, 16)
_POLICY_HEAD = _TLV.pack(Tag.POLICY, 1)
_CREATED_AT_HEAD = _TLV.pack(Tag.CREATED_AT, _U64.size)
_BLOB_VERSION_HEAD = _TLV.pack(Tag.BLOB_VERSION, _U64.size)
MAX_BLOB_VERSION = (1 << 64) - 1


def _encode_header(
    blob_id: bytes,
    namespace: str,
    name: str,
    key_ref: str,
    generation: str,
    policy: SealingPolicy,
    millis: int,
    key_request: bytes,
    version: int,
) -> bytes:
    """The canonical header (``BlobHeader.encode``) from its field values; ``seal`` calls it
    directly, so a fresh blob needs no UUID or datetime object, only their bytes."""
    if not 0 <= version <= MAX_BLOB_VERSION:
        raise ValueError(f"blob version must be 0..{MAX_BLOB_VERSION}")
    namespace_raw = _text(namespace, "namespace")
    name_raw = _text(name, "name")
    key_ref_raw = _text(key_ref, "key_ref")
    generation_raw = _text(generation, "generation")
    if (policy is SealingPolicy.KMS) == bool(key_request):
        raise ValueError("a key request goes with a TEE sealing policy, and only with one")
    tlv = _TLV.pack
    parts = [
        _BLOB_ID_HEAD,
        blob_id,
        tlv(_NAMESPACE, len(namespace_raw)),
        namespace_raw,
        tlv(_NAME, len(name_raw)),
        name_raw,
        tlv(_KEY_REF, len(key_ref_raw)),
        key_ref_raw,
        tlv(_GENERATION, len(generation_raw)),
        generation_raw,
        _POLICY_HEAD,
        bytes((policy,)),
        _CREATED_AT_HEAD,
        _U64.pack(millis),
    ]
    if key_request:
        parts += (tlv(_KEY_REQUEST, len(key_request)), key_request)
    if version:
        parts += (_BLOB_VERSION_HEAD, _U64.pack(version))
    return b"".join(parts)


def _random_uuid4() -> bytes:
    """The 16 bytes of a random (version 4) UUID, as ``uuid.uuid4().bytes``."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return bytes(raw)


class SealedBlob(NamedTuple):
    """A parsed (not yet authenticated) blob. ``aad`` is the prefix + header bytes."""

    header: BlobHeader
    key_version: int
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes | memoryview
    aad: bytes

    def __repr__(self) -> str:
        return (
            f"SealedBlob(id={self.header.blob_id}, key={self.header.key_ref} v{self.key_version},"
            f" {len(self.ciphertext)} body bytes)"
        )

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                self.aad,
                _SLOT.pack(self.key_version, len(self.wrapped_dek)),
                self.wrapped_dek,
                self.nonce,
                _BODY_LEN.pack(len(self.ciphertext)),
                self.ciphertext,
            )
        )

    def with_key_slot(self, wrapped: WrappedKey) -> SealedBlob:
        """The same blob with its DEK wrapped differently (the result of a re-wrap)."""
        _check_wrapped(wrapped.ciphertext)
        return self._replace(key_version=wrapped.key_version, wrapped_dek=wrapped.ciphertext)


def _check_wrapped(wrapped: bytes) -> None:
    if not 0 < len(wrapped) <= MAX_WRAPPED_DEK:
        raise InvalidWrappedKey(f"wrapped DEK must be 1..{MAX_WRAPPED_DEK} bytes, got {len(wrapped)}")


def _need(end: int, total: int, what: str) -> None:
    if end > total:
        raise TruncatedBlob(f"sealed blob is truncated: {what} needs {end} bytes, blob has {total}")


class _Layout(NamedTuple):
    slot: int  # offset of the key slot (= length of prefix + header)
    key_version: int
    wrapped_at: int
    nonce_at: int
    body_at: int


class _ShortHead(Exception):
    """The bytes at hand end before the key slot, nonce and body length (a head read)."""


def _layout(view: memoryview | bytes, total: int | None = None) -> _Layout:
    """Check the framing of a blob (prefix, lengths, key slot) without decoding its header.

    ``view`` is the whole blob, or with ``total`` (the blob's length) only its first bytes:
    then ``_ShortHead`` if they end before the body starts."""
    have = len(view)
    total = have if total is None else total
    if have < len(MAGIC):
        if bytes(view) != MAGIC[:have]:
            raise UnsupportedFormat("not a rekey sealed blob (bad magic)")
        if total == have:
            raise TruncatedBlob(f"sealed blob is truncated: {have} bytes")
        raise _ShortHead
    if view[:4] != MAGIC:
        raise UnsupportedFormat("not a rekey sealed blob (bad magic)")
    if total < _PREFIX.size:
        raise TruncatedBlob(f"sealed blob is truncated: {total} bytes")
    if have < _PREFIX.size:
        raise _ShortHead
    _, version, flags, header_len = _PREFIX.unpack_from(view)
    if version != FORMAT_VERSION:
        raise UnsupportedFormat(f"sealed blob format version {version} is not supported (this build reads 1)")
    if flags != 0:
        raise UnsupportedFormat(f"sealed blob flags 0x{flags:02x} are not supported")
    slot = _PREFIX.size + header_len
    _need(slot + _SLOT.size, total, "key slot")
    if slot + _SLOT.size > have:
        raise _ShortHead
    key_version, wrapped_len = _SLOT.unpack_from(view, slot)
    nonce_at = slot + _SLOT.size + wrapped_len
    body_at = nonce_at + NONCE_BYTES + _BODY_LEN.size
    _need(body_at, total, "wrapped DEK, nonce and body length")
    if body_at > have:
        raise _ShortHead
    (body_len,) = _BODY_LEN.unpack_from(view, body_at - _BODY_LEN.size)
    _need(body_at + body_len, total, "body")
    if body_at + body_len != total:
        raise TamperedBlob(f"sealed blob has {total - body_at - body_len} unexpected trailing bytes")
    if body_len < TAG_BYTES:
        raise TamperedBlob("sealed blob body is shorter than its authentication tag")
    if wrapped_len == 0 or key_version == 0:
        raise TamperedBlob("sealed blob key slot is empty")
    return _Layout(slot, key_version, slot + _SLOT.size, nonce_at, body_at)


def parse(blob: bytes | bytearray | memoryview) -> SealedBlob:
    """Parse the structure of a blob. Authentication happens in ``open_blob``."""
    view = memoryview(blob).cast("B")
    # The header parts are small copies; from a bytes blob they are sliced directly (cheaper
    # than through the view). The body stays a view of ``blob``, never copied.
    data = blob if isinstance(blob, bytes) else view
    layout = _layout(data)
    aad = bytes(data[: layout.slot])
    wrapped = bytes(data[layout.wrapped_at : layout.nonce_at])
    nonce = bytes(data[layout.nonce_at : layout.nonce_at + NONCE_BYTES])
    header = _decode_header(aad[_PREFIX.size :])
    return SealedBlob(header, layout.key_version, wrapped, nonce, view[layout.body_at :], aad)


def header_in_head(head: bytes, length: int) -> BlobHeader:
    """The (not yet authenticated) header of a blob of ``length`` bytes from its first bytes,
    at least `MAX_HEAD_BYTES` of them or all; the framing is checked against ``length``, so bad
    blobs raise as with ``parse``. ValueError if ``head`` ends before the body starts."""
    try:
        layout = _layout(head, length)
    except _ShortHead:
        raise ValueError(f"a blob head of {len(head)} bytes ends before its body starts") from None
    return _decode_header(bytes(head[_PREFIX.size : layout.slot]))


def plaintext_size(blob: bytes | bytearray | memoryview) -> int:
    """How many bytes ``blob`` seals (from its framing; nothing is decrypted or authenticated)."""
    return len(parse(blob).ciphertext) - TAG_BYTES


class KeySlot(NamedTuple):
    """Where a blob's key slot sits (bytes ``start:end``), and what it holds. The framing is
    checked, the header is not decoded: a re-wrap sweep needs only this."""

    key_version: int
    wrapped_dek: bytes
    start: int
    end: int


def key_slot(blob: bytes | bytearray | memoryview) -> KeySlot:
    """The key slot of a whole blob; typed ``SealedBlobError`` on bad framing."""
    view = blob if isinstance(blob, bytes) else memoryview(blob).cast("B")
    try:
        layout = _layout(view)
    except _ShortHead:  # cannot happen for a whole blob: _need checked against its length
        raise TruncatedBlob("sealed blob is truncated") from None
    return KeySlot(
        layout.key_version, bytes(view[layout.wrapped_at : layout.nonce_at]), layout.slot, layout.nonce_at
    )


def key_slot_in_head(head: bytes, length: int) -> KeySlot | None:
    """The key slot from the first bytes of a blob of ``length`` bytes (a sweep reads only
    those); None if ``head`` ends before the slot does (read the whole blob then). The
    framing is checked against ``length``, so bad blobs raise as with ``key_slot``."""
    have = len(head)
    # Fast path, taken by every well-formed blob: the same checks as _layout, inline (a sweep
    # runs this once per blob). Anything it does not accept goes to _layout for the verdict.
    if have >= _PREFIX.size and head[:4] == MAGIC:
        _, version, flags, header_len = _PREFIX.unpack_from(head)
        slot = _PREFIX.size + header_len
        if version == FORMAT_VERSION and flags == 0 and slot + _SLOT.size <= have:
            key_version, wrapped_len = _SLOT.unpack_from(head, slot)
            nonce_at = slot + _SLOT.size + wrapped_len
            body_at = nonce_at + NONCE_BYTES + _BODY_LEN.size
            if body_at <= have:
                (body_len,) = _BODY_LEN.unpack_from(head, body_at - _BODY_LEN.size)
                if body_at + body_len == length and body_len >= TAG_BYTES and wrapped_len and key_version:
                    return KeySlot(key_version, head[slot + _SLOT.size : nonce_at], slot, nonce_at)
    try:
        layout = _layout(head, length)
    except _ShortHead:
        return None
    return KeySlot(
        layout.key_version, head[layout.wrapped_at : layout.nonce_at], layout.slot, layout.nonce_at
    )


def slot_prefix(head: bytes, slot: KeySlot, wrapped: WrappedKey) -> bytes:
    """Prefix + header + a key slot holding ``wrapped``: what replaces ``head[:slot.end]``
    (the rest of the blob, from ``slot.end`` on, is unchanged)."""
    _check_wrapped(wrapped.ciphertext)
    if wrapped.key_version == 0:
        raise InvalidWrappedKey("wrapped DEK has key version 0")
    return b"".join(
        (head[: slot.start], _SLOT.pack(wrapped.key_version, len(wrapped.ciphertext)), wrapped.ciphertext)
    )


def replace_key_slot(blob: bytes, slot: KeySlot, wrapped: WrappedKey) -> bytes:
    """``blob`` with ``slot`` (from ``key_slot(blob)``) holding ``wrapped`` instead; the header
    and body bytes are copied unchanged."""
    return slot_prefix(blob, slot, wrapped) + blob[slot.end :]


_CRITICAL_TAGS = frozenset(int(t) for t in Tag)
_REQUIRED_TAGS = _CRITICAL_TAGS - {int(Tag.KEY_REQUEST), int(Tag.BLOB_VERSION)}
_POLICIES = {int(p): p for p in SealingPolicy}


def _decode_header(data: bytes) -> BlobHeader:
    # This runs on every unseal; locals instead of globals keep the loop cheap.
    unpack, tlv_size, critical = _TLV.unpack_from, _TLV.size, _CRITICAL_TAGS
    values: dict[int, bytes] = {}
    pos, end, last_tag = 0, len(data), 0
    while pos < end:
        if pos + tlv_size > end:
            raise TamperedBlob("sealed blob header is malformed")
        tag, length = unpack(data, pos)
        pos += tlv_size
        if pos + length > end:
            # The header length said the fields fit; a field running past it is corruption.
            raise TamperedBlob("sealed blob header is malformed")
        if tag <= last_tag:
            raise TamperedBlob("sealed blob header fields are out of order or repeated")
        last_tag = tag
        if tag < _FIRST_EXTENSION_TAG:  # extensions (>= 0x80) are skipped, still authenticated
            if tag not in critical:
                raise UnsupportedFormat(f"sealed blob header has unknown critical field 0x{tag:02x}")
            values[tag] = data[pos : pos + length]
        pos += length
    if not values.keys() >= _REQUIRED_TAGS:
        missing = sorted(Tag(t).name.lower() for t in _REQUIRED_TAGS - values.keys())
        raise TamperedBlob(f"sealed blob header lacks {', '.join(missing)}")
    try:
        namespace, name, key_ref, generation = (values[t].decode("utf-8") for t in _TEXT_TAG_IDS)
    except UnicodeDecodeError:
        raise TamperedBlob("sealed blob header has a text field that is not UTF-8") from None
    if not (namespace and name and key_ref and generation):
        raise TamperedBlob("sealed blob header has an empty text field")
    # Plain ints as keys: hashing an IntEnum member runs Python code.
    blob_id, policy_byte, created = values[_BLOB_ID], values[_POLICY], values[_CREATED_AT]
    if len(blob_id) != 16 or len(policy_byte) != 1 or len(created) != 8:
        raise TamperedBlob("sealed blob header has a field of the wrong size")
    policy = _POLICIES.get(policy_byte[0])
    if policy is None:
        raise UnsupportedFormat(f"sealing policy {policy_byte[0]} is not supported")
    key_request = values.get(_KEY_REQUEST, b"")
    if (policy is SealingPolicy.KMS) == bool(key_request):
        raise TamperedBlob("sealed blob key request does not match its sealing policy")
    version_raw = values.get(_BLOB_VERSION)
    if version_raw is None:
        version = 0  # sealed before blob versions existed
    else:
        if len(version_raw) != 8:
            raise TamperedBlob("sealed blob header has a field of the wrong size")
        version = int.from_bytes(version_raw)
        if version == 0:  # canonical: version 0 is written as no field at all
            raise TamperedBlob("sealed blob header has blob version 0")
    try:
        created_at = datetime.fromtimestamp(int.from_bytes(created) / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise TamperedBlob("sealed blob creation time is out of range") from None
    return BlobHeader(
        uuid.UUID(bytes=blob_id),
        namespace,
        name,
        key_ref,
        generation,
        policy,
        created_at,
        key_request,
        version,
    )


def seal(
    data: bytes,
    wrapper: KeyWrapper,
    *,
    namespace: str,
    name: str,
    generation: str,
    blob_id: uuid.UUID | None = None,
    policy: SealingPolicy = SealingPolicy.KMS,
    key_request: bytes = b"",
    now: datetime | None = None,
    version: int = 1,
) -> bytearray:
    """Encrypt ``data`` under a fresh DEK wrapped by ``wrapper``; return the blob (a new buffer).

    ``version`` is the blob version written into the authenticated header (>= 1): the caller
    that keeps the blob (``sealing.state``) makes it one above the name's last version."""
    if len(data) > MAX_BODY:
        raise ValueError(f"sealed data is limited to {MAX_BODY} bytes")
    if not 1 <= version <= MAX_BLOB_VERSION:
        raise ValueError(f"blob version must be 1..{MAX_BLOB_VERSION}")
    header_bytes = _encode_header(
        blob_id.bytes if blob_id is not None else _random_uuid4(),
        namespace,
        name,
        wrapper.key_ref,
        generation,
        policy,
        _millis(now) if now is not None else time.time_ns() // 1_000_000,
        key_request,
        version,
    )
    if len(header_bytes) > 0xFFFF:
        raise ValueError("sealed blob header is too large")
    aad = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)) + header_bytes
    dek = os.urandom(DEK_BYTES)
    wrapped = wrapper.wrap(dek)
    _check_wrapped(wrapped.ciphertext)
    nonce = os.urandom(NONCE_BYTES)
    body_len = len(data) + TAG_BYTES
    head = b"".join(
        (
            aad,
            _SLOT.pack(wrapped.key_version, len(wrapped.ciphertext)),
            wrapped.ciphertext,
            nonce,
            _BODY_LEN.pack(body_len),
        )
    )
    # Encrypt straight into the output buffer: encrypting to bytes and joining would copy the
    # body once more. The buffer starts zeroed (plain bytearray), as the bytes AESGCM.encrypt
    # returns do, so no byte of it is ever stale memory, whatever a length says.
    out = bytearray(len(head) + body_len)
    out[: len(head)] = head
    AESGCM(dek).encrypt_into(nonce, data, aad, memoryview(out)[len(head) :])
    return out


def _check_key(blob: SealedBlob, wrapper: KeyWrapper) -> None:
    if blob.header.key_ref != wrapper.key_ref:
        # Callers resolve the wrapper from the stored record, so a different name in the
        # header means the header (or the record) was altered.
        raise TamperedBlob(
            f"sealed blob header names key {blob.header.key_ref!r}, expected {wrapper.key_ref!r}"
        )
    try:
        named = wrapper.version_of(blob.wrapped_dek)
    except InvalidWrappedKey:
        raise TamperedBlob("sealed blob key slot does not hold a wrapped DEK for this key") from None
    if named != blob.key_version:
        raise TamperedBlob(
            f"sealed blob key slot says version {blob.key_version} but its wrapped DEK is version {named}"
        )


def open_parsed(blob: SealedBlob, wrapper: KeyWrapper) -> bytes:
    """Authenticate and decrypt a parsed blob."""
    _check_key(blob, wrapper)
    try:
        dek = wrapper.unwrap(blob.wrapped_dek)
    except InvalidWrappedKey:
        raise TamperedBlob("sealed blob's wrapped DEK does not unwrap") from None
    if len(dek) != DEK_BYTES:
        raise TamperedBlob("sealed blob's wrapped DEK has the wrong length")
    try:
        return AESGCM(dek).decrypt(blob.nonce, blob.ciphertext, blob.aad)
    except InvalidTag:
        raise TamperedBlob(f"sealed blob {blob.header.blob_id} failed authentication") from None


def open_blob(blob: bytes | bytearray | memoryview, wrapper: KeyWrapper) -> bytes:
    """Parse, authenticate and decrypt ``blob``; every failure is a typed ``SealingError``."""
    return open_parsed(parse(blob), wrapper)


def rewrap(blob: bytes, wrapper: KeyWrapper) -> bytes:
    """Re-wrap the blob's DEK to the wrapper's primary version; the body is not touched."""
    parsed = parse(blob)
    _check_key(parsed, wrapper)
    try:
        wrapped = wrapper.rewrap(parsed.wrapped_dek)
    except InvalidWrappedKey:
        raise TamperedBlob("sealed blob's wrapped DEK does not unwrap") from None
    return parsed.with_key_slot(wrapped).to_bytes()


def open_with_dek(blob: SealedBlob, dek: bytes) -> bytes:
    """Authenticate and decrypt a parsed KMS blob with its already unwrapped DEK (an enclave
    that obtained the DEK through the attested release gate)."""
    if blob.header.policy is not SealingPolicy.KMS:
        raise TamperedBlob(f"sealed blob {blob.header.blob_id} is not KMS-wrapped")
    if len(dek) != DEK_BYTES:
        raise TamperedBlob("sealed blob's released DEK has the wrong length")
    try:
        return AESGCM(dek).decrypt(blob.nonce, blob.ciphertext, blob.aad)
    except InvalidTag:
        raise TamperedBlob(f"sealed blob {blob.header.blob_id} failed authentication") from None


def rebound(blob: SealedBlob, dek: bytes, generation: str) -> bytes:
    """``blob`` bound to ``generation``: the body decrypted with ``dek`` and encrypted again
    under the same DEK with a fresh nonce and the header naming ``generation`` (the header is
    the body's associated data, so it cannot just be edited). The key slot (wrapped DEK, key
    version) is kept: the DEK did not change, so no KMS call is needed to wrap it."""
    data = open_with_dek(blob, dek)
    header = blob.header._replace(generation=generation)
    header_bytes = header.encode()
    if len(header_bytes) > 0xFFFF:
        raise ValueError("sealed blob header is too large")
    aad = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_bytes)) + header_bytes
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(dek).encrypt(nonce, data, aad)
    return b"".join(
        (
            aad,
            _SLOT.pack(blob.key_version, len(blob.wrapped_dek)),
            blob.wrapped_dek,
            nonce,
            _BODY_LEN.pack(len(ciphertext)),
            ciphertext,
        )
    )
