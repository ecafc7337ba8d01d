"""Payload encryption for everything rekey sends through Temporal.

Every client and worker uses :func:`data_converter`, so workflow and activity inputs,
results, signals, queries, updates, memos, heartbeat details and failure details are
AES-256-GCM encrypted before they leave the process. The Temporal server, its database
and anyone reading a history see only ciphertext. Failure messages and stack traces are
moved into the encrypted part of the failure too (``encode_common_attributes``); the UI
shows them through the codec server (:mod:`rekey.codec_server`).

Not covered by any codec, by Temporal's design: workflow and activity ids, types, task
queues, search attributes and headers. Never put key material in those.

Wire format of an encrypted payload (format 2, what :meth:`EncryptionCodec.encode` writes)::

    metadata: encoding = "binary/encrypted", encryption-key-id = <key id>,
              encryption-format = "2", encrypted-encoding = <the original payload's encoding>
    data:     nonce (12 random bytes) || AES-256-GCM(serialized original Payload) || tag (16 bytes)
    AAD:      "rekey-codec/2" NUL, then every outer metadata entry sorted by key, each key and
              value preceded by its 4-byte big-endian length

so the key id, the format and the visible encoding are authenticated, a ciphertext moved
into a payload with other metadata fails its tag, and the decrypted payload's own
``encoding`` must equal ``encrypted-encoding``. (``encrypted-encoding`` reveals only the
kind of value, e.g. ``json/plain`` or ``binary/null``.) The codec cannot bind a ciphertext
to its workflow or history slot: it is not told where a payload goes, and the codec server
(the UI) could not supply it either; a ciphertext copied whole into another slot of the
same kind still decodes.

Format 1 (no ``encryption-format`` metadata; AAD: the key id only) is still accepted on
decode, so histories recorded before format 2 stay readable; it is never written.

Payloads without ``encoding: binary/encrypted`` are refused by decode (a forged plain
payload handed to a worker must not be accepted), unless the codec is built with
``allow_unencrypted=True`` (reading histories written before encryption was enabled; the
codec server does this for display only). An unknown key id or format, a short or tampered
ciphertext, or a plaintext that is not a Payload raise :class:`CodecError`; decode never
returns unauthenticated bytes.

Codec keys live in a keyring: one current key encrypts, every key in the ring decrypts.
Rotating the codec key (:func:`rotate_codec_key`) adds a new current key and keeps the
old ones, which stay needed for as long as histories encrypted under them are retained.

Key storage (development default): ``<home>/codec/keys.json``, mode 0600::

    {"current": "<id>", "keys": {"<id>": "<base64 32-byte key>"}}

with ``id`` = the first 16 hex digits of SHA-256 of the key. **Losing this file makes
every encrypted history, pending workflow input and result unreadable**; back it up
with the rest of the state directory and never commit it. A plaintext key file is the
dev default only: in production the keyring should be wrapped by a KMS key (envelope
encryption, unwrapped into memory at start) or served by a KMS-backed codec service.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import temporalio.converter
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
FORMAT_METADATA = "encryption-format"
INNER_ENCODING_METADATA = "encrypted-encoding"
FORMAT_VERSION = b"2"
AAD_PREFIX = b"rekey-codec/2\0"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEYS_FILE = Path("codec") / "keys.json"


class CodecError(Exception):
    """A payload or the codec keyring cannot be used (unknown key, failed tag, bad file)."""


def key_id_for(key: bytes) -> str:
    """The id of a codec key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True)
class Keyring:
    """Codec keys by id; ``current`` encrypts, all of them decrypt."""

    current: str
    keys: Mapping[str, bytes] = field(repr=False)

    def __post_init__(self) -> None:
        if self.current not in self.keys:
            raise CodecError(f"current codec key {self.current!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if len(key) != KEY_BYTES:
                raise CodecError(f"codec key {key_id!r} is {len(key)} bytes, expected {KEY_BYTES}")
            if key_id_for(key) != key_id:
                raise CodecError(f"codec key {key_id!r} does not match its id (corrupt keyring?)")
        object.__setattr__(self, "keys", dict(self.keys))

    @classmethod
    def generate(cls) -> Keyring:
        key = secrets.token_bytes(KEY_BYTES)
        return cls(current=key_id_for(key), keys={key_id_for(key): key})

    def with_new_current(self, key: bytes | None = None) -> Keyring:
        """A keyring with ``key`` (default: a fresh random key) added and made current."""
        key = secrets.token_bytes(KEY_BYTES) if key is None else key
        new_id = key_id_for(key)
        return Keyring(current=new_id, keys={**self.keys, new_id: key})

    def to_json(self) -> str:
        keys = {key_id: base64.b64encode(key).decode("ascii") for key_id, key in self.keys.items()}
        return json.dumps({"current": self.current, "keys": keys}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        try:
            raw = json.loads(text)
            current = raw["current"]
            keys = {str(k): base64.b64decode(v, validate=True) for k, v in raw["keys"].items()}
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as err:
            raise CodecError(f"codec keyring is not valid JSON of the expected shape: {err}") from None
        if not isinstance(current, str):
            raise CodecError("codec keyring: 'current' must be a string")
        return cls(current=current, keys=keys)


def associated_data(metadata: Mapping[str, bytes]) -> bytes:
    """Format 2 AAD: every outer metadata entry, sorted, length-prefixed (unambiguous)."""
    parts = [AAD_PREFIX]
    for key in sorted(metadata):
        raw_key = key.encode("utf-8")
        value = metadata[key]
        parts += [len(raw_key).to_bytes(4, "big"), raw_key, len(value).to_bytes(4, "big"), value]
    return b"".join(parts)


class EncryptionCodec(temporalio.converter.PayloadCodec):
    """AES-256-GCM payload codec over a :class:`Keyring` (see the module docstring).

    ``allow_unencrypted``: decode returns payloads without the codec's encoding unchanged
    instead of refusing them. Only for reading (the codec server, histories from before
    encryption was enabled); never for a worker.
    """

    def __init__(self, keyring: Keyring, *, allow_unencrypted: bool = False) -> None:
        self._keyring = keyring
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keyring.keys.items()}
        self._allow_unencrypted = allow_unencrypted

    @property
    def key_id(self) -> str:
        """Id of the key new payloads are encrypted under."""
        return self._keyring.current

    def encode_payload(self, payload: Payload) -> Payload:
        key_id = self._keyring.current
        metadata = {
            "encoding": ENCODING,
            KEY_ID_METADATA: key_id.encode("ascii"),
            FORMAT_METADATA: FORMAT_VERSION,
        }
        if "encoding" in payload.metadata:
            metadata[INNER_ENCODING_METADATA] = payload.metadata["encoding"]
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), associated_data(metadata))
        return Payload(metadata=metadata, data=nonce + sealed)

    def decode_payload(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            if self._allow_unencrypted:
                return payload
            raise CodecError(
                "payload is not encrypted (encoding is not 'binary/encrypted'); refused because "
                "payload encryption is configured"
            )
        raw_id = payload.metadata.get(KEY_ID_METADATA)
        if raw_id is None:
            raise CodecError(f"encrypted payload has no {KEY_ID_METADATA!r} metadata")
        key_id = raw_id.decode("ascii", errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CodecError(
                f"payload is encrypted under codec key {key_id!r}, which is not in the keyring "
                f"(known: {', '.join(sorted(self._ciphers))})"
            )
        version = payload.metadata.get(FORMAT_METADATA)
        if version == FORMAT_VERSION:
            aad = associated_data(dict(payload.metadata))
        elif version is None:  # format 1, written before the metadata was bound
            extra = set(payload.metadata) - {"encoding", KEY_ID_METADATA}
            if extra:
                raise CodecError(f"format 1 encrypted payload has unexpected metadata {sorted(extra)}")
            aad = raw_id
        else:
            raise CodecError(f"encrypted payload has unknown {FORMAT_METADATA!r} {version[:16]!r}")
        data = payload.data
        if len(data) < NONCE_BYTES + TAG_BYTES:
            raise CodecError(f"encrypted payload under key {key_id!r} is too short ({len(data)} bytes)")
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], aad)
        except InvalidTag:
            raise CodecError(
                f"encrypted payload under key {key_id!r} failed authentication "
                "(tampered, moved from a payload with other metadata, or wrong key)"
            ) from None
        try:
            inner = Payload.FromString(plain)
        except DecodeError as err:
            raise CodecError(f"decrypted payload under key {key_id!r} is not a Payload: {err}") from None
        if version is not None and inner.metadata.get("encoding") != payload.metadata.get(
            INNER_ENCODING_METADATA
        ):
            raise CodecError(
                f"decrypted payload under key {key_id!r} does not match its {INNER_ENCODING_METADATA!r}"
            )
        return inner

    def encode_sync(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encode_payload(p) for p in payloads]

    def decode_sync(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decode_payload(p) for p in payloads]

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.encode_sync(payloads)

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return self.decode_sync(payloads)


def codec_keys_path(home: Path) -> Path:
    return Path(home) / KEYS_FILE


def write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically.

    The content goes to a temporary file opened with O_CREAT | O_EXCL first, then is
    hard-linked into place (``replace=False``: fails with FileExistsError if ``path``
    exists) or renamed over ``path`` (``replace=True``). Readers never see a partial file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_keyring(path: Path) -> Keyring:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CodecError(
            f"{path} has mode {mode:04o}; the codec keyring must not be group/world accessible (chmod 600)"
        )
    return Keyring.from_json(path.read_text())


def load_or_create_codec_keys(home: Path) -> Keyring:
    """The keyring at ``<home>/codec/keys.json``, created with one random key if absent.

    Safe against concurrent first use: exactly one process creates the file, the others
    read what it wrote. See the module docstring on backups and production key storage.
    """
    path = codec_keys_path(home)
    if path.exists():
        return _read_keyring(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    keyring = Keyring.generate()
    try:
        write_private(path, keyring.to_json(), replace=False)
    except FileExistsError:
        return _read_keyring(path)
    return keyring


def rotate_codec_key(home: Path) -> Keyring:
    """Add a fresh codec key and make it current; older keys stay for decoding.

    Running workers keep encrypting under the key they loaded until restarted; that is
    harmless because every key in the ring decrypts. Do not remove an old key while any
    retained history may still hold payloads encrypted under it.
    """
    path = codec_keys_path(home)
    load_or_create_codec_keys(home)
    with open(path.with_name(".keys.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # serialise concurrent rotations; no key is lost
        rotated = _read_keyring(path).with_new_current()
        write_private(path, rotated.to_json(), replace=True)
    return rotated


def data_converter(
    home: Path,
    *,
    keyring: Keyring | None = None,
    encrypt_failures: bool = True,
    allow_unencrypted: bool = False,
) -> temporalio.converter.DataConverter:
    """The default Temporal data converter with :class:`EncryptionCodec`; use it for every client.

    Workers take the converter of the client they are built on, so they refuse unencrypted
    payloads. ``encrypt_failures`` moves failure messages and stack traces into the
    encrypted failure attributes. ``allow_unencrypted`` (reading pre-encryption histories
    only) lets plain payloads decode unchanged.
    """
    ring = keyring if keyring is not None else load_or_create_codec_keys(home)
    converter = dataclasses.replace(
        temporalio.converter.DataConverter.default,
        payload_codec=EncryptionCodec(ring, allow_unencrypted=allow_unencrypted),
    )
    if encrypt_failures:
        converter = dataclasses.replace(
            converter,
            failure_converter_class=temporalio.converter.DefaultFailureConverterWithEncodedAttributes,
        )
    return converter
