"""Payload encryption for everything rekey sends through Temporal.

Every client and worker uses :func:`data_converter`, so workflow and activity inputs,
results, signals, queries, updates, memos, heartbeat details and failure details are
AES-256-GCM encrypted before they leave the process. The Temporal server, its database
and anyone reading a history see only ciphertext. Failure messages and stack traces are
moved into the encrypted part of the failure too (``encode_common_attributes``); the UI
shows them through the codec server (:mod:`rekey.codec_server`).

Not covered by any codec, by Temporal's design: workflow and activity ids, types, task
queues, search attributes and headers. Never put key material in those.

Wire format of an encrypted payload (format 3, what :meth:`EncryptionCodec.encode` writes
whenever Temporal says where the payload goes, which it does for every workflow and
activity payload of a client and a worker)::

    metadata: encoding = "binary/encrypted", encryption-key-id = <key id>,
              encryption-format = "3", encrypted-encoding = <the original payload's encoding>,
              encryption-namespace = <namespace>,
              encryption-workflow-id = <workflow id> (absent for an activity no workflow started)
    data:     nonce (12 random bytes) || AES-256-GCM(serialized original Payload) || tag (16 bytes)
    AAD:      "rekey-codec/3" NUL, then every outer metadata entry sorted by key, each key and
              value preceded by its 4-byte big-endian length

Where a payload goes is Temporal's serialization context (``with_context``): the namespace
and the workflow of which it is an input or output. Workflow input, memo, signals, queries,
updates and their results and the workflow's result and failure carry that workflow's id; an
activity's input, result, heartbeat details and failure carry the id of the workflow that
scheduled it; a child workflow's input and result the child's id; a signal to another
workflow the target's id. The bound namespace and workflow id are in clear (authenticated by
the tag), so the codec server can decode for display knowing only the namespace.

Decode with a context refuses a format 3 payload bound to another namespace or workflow: an
encrypted payload copied from workflow A's history (a start input naming another key, an
approval update or signal) into a request for workflow B, or into another namespace, is
refused and nothing acts on it (what a worker then does: "Refused payloads in a worker"
below). One exception: a schedule encrypts its action's
input for the configured workflow id, and the server starts each run as ``<id>-<time>``
(``2026-12-02T00:33:00Z``), so for ids starting with one of ``scheduled_prefixes`` (rekey's
launcher prefix) a run ``<id>-<RFC 3339 UTC second>`` reads what ``<id>`` bound; starting
such a run by hand with that input is what triggering the schedule does anyway. A schedule
copied by hand under another id must decode its action's input and encode it again (the
encrypted input ``describe()`` returns is bound to the old id). Decode without a context (a
bare client, the codec server without ``X-Namespace``) checks no binding.

The key id, the format, the visible encoding and the bound ids are authenticated: a
ciphertext moved into a payload with other metadata fails its tag, and the decrypted
payload's own ``encoding`` must equal ``encrypted-encoding``. (``encrypted-encoding``
reveals only the kind of value, e.g. ``json/plain`` or ``binary/null``.) Not bound: the slot
within one workflow; a ciphertext copied into another payload of the same workflow (an
activity result into an update of the same workflow, say) still decodes.

Format 2 (``encryption-format = "2"``, no bound ids; AAD prefix ``"rekey-codec/2" NUL``) is
written by a codec that has no context (the codec server's ``/encode``, so with
``codec_min_format = 3`` workers refuse input encoded there, e.g. by ``temporal workflow
start --codec-endpoint``). Format 1 (no
``encryption-format`` metadata; AAD: the key id only) is never written. Both still decode by
default, so histories, pending inputs and schedules recorded before format 3 stay readable;
the setting ``codec_min_format = 3`` (``min_format``) refuses them once none is left.

Payloads without ``encoding: binary/encrypted`` are refused by decode (a forged plain
payload handed to a worker must not be accepted), unless the codec is built with
``allow_unencrypted=True`` (reading histories written before encryption was enabled; the
codec server does this for display only). An unknown key id or format, a short or tampered
ciphertext, or a plaintext that is not a Payload raise :class:`CodecError`; decode never
returns unauthenticated bytes.

Refused payloads in a worker. A client and the codec server raise :class:`CodecError` for a
refused payload (the caller sees why). A worker's codec (``drop_refused``, made by
:func:`worker_converter`; ``rekey.worker.build_worker`` uses it) instead decodes it to
:func:`refused_payload` (encoding ``binary/rekey-refused``, no data), which no payload
converter knows, and logs a warning naming the namespace, the workflow and the reason (key
ids, formats, bound ids; never data). Raising there would fail the whole workflow task, and
the SDK retries a failed task for ever: one copied or plain signal would keep the workflow
from processing any later signal, update, pause or abort. With the stand-in, the SDK (1.35;
``temporalio.worker._workflow_instance``) turns it into a conversion error where the value is
used, so per path:

* signal: the SDK logs "Failed deserializing signal input ... dropping the signal" and drops
  it; the workflow goes on and processes later signals;
* update: rejected before its validator runs (the caller gets the rejection); later updates
  work;
* query: the query fails; the workflow is untouched;
* workflow start input, activity result, child workflow result, memo read, a failure's
  ``details``: the conversion error fails the workflow task, as the raising codec did (the
  workflow has nothing to go on without the value); retried until terminated;
* activity input: the activity fails ("Failed decoding arguments") and is retried by its
  policy; heartbeat details: fails it non-retryably, both as before;
* a failure's encrypted message and stack (``encoded_attributes``): the SDK keeps the outer
  ``"Encoded failure"`` as the message; the failure's type, ``non_retryable`` flag and
  ``details`` are handled as without a codec. The refused text never reaches the workflow.

Never give a workflow handler or activity a ``RawValue`` (or dynamic, raw) parameter: the SDK
hands such a parameter the payload unconverted, so the stand-in would reach the code (and, sent
on to an activity, be encrypted afresh). rekey's workflows have none.

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
import copy
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import temporalio.converter
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload

from rekey.logs import register_secret
from sealing.private_file import PrivateFileError, read_private

MAX_KEYRING_BYTES = 4 * 1024 * 1024  # a keyring of ~50,000 keys
MAX_KEY_ID_BYTES = 64  # key ids are 16 hex digits

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
FORMAT_METADATA = "encryption-format"
INNER_ENCODING_METADATA = "encrypted-encoding"
NAMESPACE_METADATA = "encryption-namespace"
WORKFLOW_ID_METADATA = "encryption-workflow-id"
FORMAT_VERSION = b"2"
AAD_PREFIX = b"rekey-codec/2\0"
BOUND_FORMAT_VERSION = b"3"
BOUND_AAD_PREFIX = b"rekey-codec/3\0"
FORMATS = (1, 2, 3)
# Workflow-id prefixes of schedule actions (rekey.client.ids.LAUNCH_PREFIX; a unit test keeps
# them equal). A schedule's action input is encoded bound to the configured id, and the server
# starts each run as "<id>-<RFC 3339 UTC second>".
SCHEDULED_ID_PREFIXES: tuple[str, ...] = ("launch:",)
_SCHEDULED_SUFFIX = re.compile(r"-\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KEYS_FILE = Path("codec") / "keys.json"
REFUSED_ENCODING = b"binary/rekey-refused"
"""The encoding of what a worker's codec (``drop_refused``) returns for a payload it refuses: no
payload converter knows it, so the SDK cannot turn it into a value."""

log = logging.getLogger(__name__)


def refused_payload() -> Payload:
    """The stand-in a worker's codec returns for a refused payload: no data, an unknown encoding."""
    return Payload(metadata={"encoding": REFUSED_ENCODING}, data=b"")


def is_refused(payload: Payload) -> bool:
    return payload.metadata.get("encoding") == REFUSED_ENCODING


class CodecError(Exception):
    """A payload or the codec keyring cannot be used (unknown key, failed tag, bad file)."""

    exit_code = 1


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
            register_secret(key)  # never in a log line of this process
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


def associated_data(metadata: Mapping[str, bytes], prefix: bytes = AAD_PREFIX) -> bytes:
    """Format 2 (and, with ``BOUND_AAD_PREFIX``, 3) AAD: every outer metadata entry, sorted,
    length-prefixed (unambiguous)."""
    parts = [prefix]
    for key in sorted(metadata):
        raw_key = key.encode("utf-8")
        value = metadata[key]
        parts += [len(raw_key).to_bytes(4, "big"), raw_key, len(value).to_bytes(4, "big"), value]
    return b"".join(parts)


def _show(workflow_id: str | None) -> str:
    return "none (an activity without a workflow)" if workflow_id is None else repr(workflow_id[:200])


@dataclass(frozen=True)
class CodecContext:
    """Where a payload goes: its namespace and workflow id (``None``: an activity not started
    by a workflow). ``check_workflow=False``: only the namespace is known (the codec server)."""

    namespace: str
    workflow_id: str | None
    check_workflow: bool = True


class EncryptionCodec(temporalio.converter.PayloadCodec, temporalio.converter.WithSerializationContext):
    """AES-256-GCM payload codec over a :class:`Keyring` (see the module docstring).

    ``allow_unencrypted``: decode returns payloads without the codec's encoding unchanged
    instead of refusing them. Only for reading (the codec server, histories from before
    encryption was enabled); never for a worker.

    ``min_format``: decode refuses encrypted payloads of an older format (3: only payloads
    bound to their namespace and workflow). ``scheduled_prefixes``: workflow ids whose
    payloads a schedule writes (see :data:`SCHEDULED_ID_PREFIXES`).

    ``drop_refused`` (a worker's codec, :meth:`for_worker`): decode returns
    :func:`refused_payload` for a payload it refuses, and logs a warning, instead of raising
    :class:`CodecError`; see the module docstring for what the SDK then does. Clients and the
    codec server keep raising.

    Temporal gives the codec the payload's :class:`CodecContext` through
    :meth:`with_context`; a codec without one (a bare client, the codec server) writes
    format 2 and decodes every format without checking where a payload came from.
    """

    def __init__(
        self,
        keyring: Keyring,
        *,
        allow_unencrypted: bool = False,
        min_format: int = 1,
        scheduled_prefixes: Sequence[str] = SCHEDULED_ID_PREFIXES,
        drop_refused: bool = False,
    ) -> None:
        if min_format not in FORMATS:
            raise CodecError(f"min_format must be one of {FORMATS}, got {min_format!r}")
        self._keyring = keyring
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keyring.keys.items()}
        self._allow_unencrypted = allow_unencrypted
        self._min_format = min_format
        self._scheduled_prefixes = tuple(scheduled_prefixes)
        self._drop_refused = drop_refused
        self._context: CodecContext | None = None

    @property
    def key_id(self) -> str:
        """Id of the key new payloads are encrypted under."""
        return self._keyring.current

    @property
    def context(self) -> CodecContext | None:
        """Where this codec's payloads go, if Temporal said so."""
        return self._context

    @property
    def drops_refused(self) -> bool:
        """Whether decode turns a refused payload into :func:`refused_payload` (a worker's codec)."""
        return self._drop_refused

    def for_worker(self) -> EncryptionCodec:
        """This codec (same keys and options) as a worker's: refused payloads decode to
        :func:`refused_payload` instead of raising (see the module docstring)."""
        if self._allow_unencrypted:
            raise CodecError("a worker's codec must not accept unencrypted payloads")
        worker = copy.copy(self)
        worker._drop_refused = True
        return worker

    def bound_to(self, context: CodecContext | None) -> EncryptionCodec:
        """This codec (same keys and options) for payloads of ``context``."""
        bound = copy.copy(self)
        bound._context = context
        return bound

    def for_namespace(self, namespace: str | None) -> EncryptionCodec:
        """For the codec server: check only the namespace (``None``: check nothing)."""
        if not namespace:
            return self.bound_to(None)
        return self.bound_to(CodecContext(namespace, None, check_workflow=False))

    def with_context(self, context: temporalio.converter.SerializationContext) -> Self:
        if isinstance(context, temporalio.converter.WorkflowSerializationContext):
            return self.bound_to(CodecContext(context.namespace, context.workflow_id))  # type: ignore[return-value]
        if isinstance(context, temporalio.converter.ActivitySerializationContext):
            return self.bound_to(CodecContext(context.namespace, context.workflow_id))  # type: ignore[return-value]
        return self.bound_to(None)  # type: ignore[return-value]  # Nexus: rekey has none

    def encode_payload(self, payload: Payload) -> Payload:
        key_id = self._keyring.current
        context = self._context
        metadata = {
            "encoding": ENCODING,
            KEY_ID_METADATA: key_id.encode("ascii"),
            FORMAT_METADATA: FORMAT_VERSION,
        }
        prefix = AAD_PREFIX
        if context is not None and context.check_workflow:
            metadata[FORMAT_METADATA] = BOUND_FORMAT_VERSION
            metadata[NAMESPACE_METADATA] = context.namespace.encode("utf-8")
            if context.workflow_id is not None:
                metadata[WORKFLOW_ID_METADATA] = context.workflow_id.encode("utf-8")
            prefix = BOUND_AAD_PREFIX
        if "encoding" in payload.metadata:
            metadata[INNER_ENCODING_METADATA] = payload.metadata["encoding"]
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(
            nonce, payload.SerializeToString(), associated_data(metadata, prefix)
        )
        return Payload(metadata=metadata, data=nonce + sealed)

    def _workflow_matches(self, bound: str | None, target: str | None) -> bool:
        if bound == target:
            return True
        if bound is None or target is None or not bound.startswith(self._scheduled_prefixes):
            return False
        # A schedule's run "<id>-<time>" decodes the action input bound to "<id>".
        return target.startswith(bound) and _SCHEDULED_SUFFIX.fullmatch(target[len(bound) :]) is not None

    def _check_binding(self, metadata: Mapping[str, bytes], key_id: str) -> None:
        """Refuse a format 3 payload bound to another namespace or workflow than the context's."""
        raw_ns = metadata.get(NAMESPACE_METADATA)
        if raw_ns is None:
            raise CodecError(f"format 3 encrypted payload has no {NAMESPACE_METADATA!r} metadata")
        context = self._context
        if context is None:
            return
        raw_wf = metadata.get(WORKFLOW_ID_METADATA)
        bound_ns = raw_ns.decode("utf-8", errors="replace")
        bound_wf = None if raw_wf is None else raw_wf.decode("utf-8", errors="replace")
        if bound_ns != context.namespace:
            raise CodecError(
                f"encrypted payload under key {key_id!r} belongs to namespace {bound_ns[:200]!r}, "
                f"not {context.namespace[:200]!r}; refused (copied from another namespace?)"
            )
        if context.check_workflow and not self._workflow_matches(bound_wf, context.workflow_id):
            raise CodecError(
                f"encrypted payload under key {key_id!r} belongs to workflow {_show(bound_wf)}, "
                f"not {_show(context.workflow_id)}; refused (copied from another workflow?)"
            )

    def decode_payload(self, payload: Payload) -> Payload:
        if not self._drop_refused:
            return self._decode_payload(payload)
        try:
            return self._decode_payload(payload)
        except CodecError as refused:
            # The reason names key ids, formats and the bound namespace and workflow, never data.
            context = self._context
            log.warning(
                "payload refused by the worker's codec (namespace %s, workflow %s), handed on as %r so "
                "nothing acts on it: %s",
                "unknown" if context is None else repr(context.namespace[:200]),
                "unknown" if context is None else _show(context.workflow_id),
                REFUSED_ENCODING.decode(),
                refused,
            )
            return refused_payload()

    def _decode_payload(self, payload: Payload) -> Payload:
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
        if len(raw_id) > MAX_KEY_ID_BYTES:  # attacker-chosen text never grows a log line unbounded
            raise CodecError(f"encrypted payload has a malformed {KEY_ID_METADATA!r} ({len(raw_id)} bytes)")
        key_id = raw_id.decode("ascii", errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise CodecError(
                f"payload is encrypted under codec key {key_id!r}, which is not in the keyring "
                f"(known: {', '.join(sorted(self._ciphers))}); clients and workers need the same"
                " codec keys (<home>/codec/keys.json: the same REKEY_HOME, or a copy of that file)"
            )
        version = payload.metadata.get(FORMAT_METADATA)
        if version == BOUND_FORMAT_VERSION:
            number = 3
            aad = associated_data(dict(payload.metadata), BOUND_AAD_PREFIX)
        elif version == FORMAT_VERSION:
            number = 2
            extra = {NAMESPACE_METADATA, WORKFLOW_ID_METADATA} & set(payload.metadata)
            if extra:
                raise CodecError(f"format 2 encrypted payload has format 3 metadata {sorted(extra)}")
            aad = associated_data(dict(payload.metadata))
        elif version is None:  # format 1, written before the metadata was bound
            number = 1
            extra = set(payload.metadata) - {"encoding", KEY_ID_METADATA}
            if extra:
                raise CodecError(f"format 1 encrypted payload has unexpected metadata {sorted(extra)}")
            aad = raw_id
        else:
            raise CodecError(f"encrypted payload has unknown {FORMAT_METADATA!r} {version[:16]!r}")
        if number < self._min_format:
            raise CodecError(
                f"encrypted payload under key {key_id!r} is format {number}, not bound to its workflow; "
                f"refused because codec_min_format is {self._min_format}"
            )
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
        if number == 3:  # the bound ids are authentic now
            self._check_binding(payload.metadata, key_id)
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
    # Opened once without following a symlink; owner, type and mode are checked on that
    # descriptor and the keys read from it (no check-then-read race on the path).
    try:
        data = read_private(path, limit=MAX_KEYRING_BYTES)
    except PrivateFileError as exc:
        raise CodecError(f"the codec keyring: {exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{path} is not a codec keyring (not UTF-8)") from None
    return Keyring.from_json(text)


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
    min_format: int = 1,
    scheduled_prefixes: Sequence[str] = SCHEDULED_ID_PREFIXES,
    drop_refused: bool = False,
) -> temporalio.converter.DataConverter:
    """The default Temporal data converter with :class:`EncryptionCodec`; use it for every client.

    Workers take the converter of the client they are built on, so they refuse unencrypted
    payloads, and Temporal hands the codec each payload's namespace and workflow (format 3).
    ``encrypt_failures`` moves failure messages and stack traces into the encrypted failure
    attributes. ``allow_unencrypted`` (reading pre-encryption histories only) lets plain
    payloads decode unchanged. ``min_format`` (setting ``codec_min_format``): refuse older
    formats on decode. ``drop_refused``: a worker's converter (see :func:`worker_converter`).
    """
    ring = keyring if keyring is not None else load_or_create_codec_keys(home)
    converter = dataclasses.replace(
        temporalio.converter.DataConverter.default,
        payload_codec=EncryptionCodec(
            ring,
            allow_unencrypted=allow_unencrypted,
            min_format=min_format,
            scheduled_prefixes=scheduled_prefixes,
            drop_refused=drop_refused,
        ),
    )
    if encrypt_failures:
        converter = dataclasses.replace(
            converter,
            failure_converter_class=temporalio.converter.DefaultFailureConverterWithEncodedAttributes,
        )
    return converter


def worker_converter(converter: temporalio.converter.DataConverter) -> temporalio.converter.DataConverter:
    """``converter`` (a client's, from :func:`data_converter`) as a worker's: its codec decodes
    a refused payload to :func:`refused_payload` instead of raising, so one refused signal or
    update does not fail every workflow task of its workflow. :class:`CodecError` if the
    converter has no :class:`EncryptionCodec`."""
    codec = converter.payload_codec
    if not isinstance(codec, EncryptionCodec):
        raise CodecError("a rekey worker needs rekey's payload codec (rekey.codec.data_converter)")
    return dataclasses.replace(converter, payload_codec=codec.for_worker())
