"""The freshness witness: signed checkpoints kept outside the store, so that someone who can
write the store's tables (or restore them from a backup) cannot make an old state look current.

A checkpoint says "``subject`` of ``kind`` has reached ``order``" (a blob's version, the audit
log's last sequence number) with a small ``body`` (the blob id, the record hash), signed by a
`sealing.signing.Signer`. Checkpoints only move forward: `Witness.advance` replaces one only by
a higher ``order``, under a lock, so concurrent writers cannot move it back either. The one
exception is `Witness.reset`, the operator's recovery after a legitimate restore, which signs a
replacement whatever the current order (so it, too, needs the signing key).

`DirectoryWitness` keeps one JSON file per subject in a directory (default
``<home>/witness``, 0700). It protects only if the store's writers cannot write that
directory: point it at another mount or host for that (see README, "Security model").

File ``<dir>/<kind>/<sha256(subject)[:40]>.json``::

    {"statement": {"body": {...}, "format": 1, "kind": K, "order": N, "subject": S},
     "key_id": "<16 hex>", "signature": "<hex>"}

The signature is over SHA-256 of the statement's canonical JSON (sorted keys, no spaces,
UTF-8), so a checkpoint copied to another subject's file, edited, or signed by a key that is
not pinned is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

from sealing.errors import SealingError
from sealing.signing import PublicKey, Signer, verify_digest

__all__ = [
    "Checkpoint",
    "DirectoryWitness",
    "ResettableWitness",
    "Witness",
    "WitnessError",
    "statement_digest",
]

FORMAT: Final = 1
MAX_FILE_BYTES: Final = 64 * 1024
_KIND_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")
_OPEN_FLAGS: Final = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class WitnessError(SealingError):
    """A checkpoint that cannot be read, is not validly signed by a pinned key, or cannot be
    written. Names the file, never a secret."""

    exit_code = 1


class Checkpoint(NamedTuple):
    kind: str
    subject: str
    order: int
    body: dict[str, Any]
    key_id: str


class Witness(Protocol):
    def advance(self, kind: str, subject: str, order: int, body: Mapping[str, Any]) -> Checkpoint:
        """Record that ``subject`` reached ``order`` unless a checkpoint with ``order`` or
        higher exists; return the checkpoint now kept (which may be newer than this one)."""
        ...

    def latest(self, kind: str, subject: str) -> Checkpoint | None:
        """The verified checkpoint of ``subject``, or None if there is none."""
        ...


@runtime_checkable
class ResettableWitness(Witness, Protocol):
    """A witness an operator can re-anchor after a legitimate restore."""

    def reset(self, kind: str, subject: str, order: int, body: Mapping[str, Any]) -> Checkpoint:
        """Replace the checkpoint of ``subject`` by this one whatever its order (even lower), and
        whether or not the current one verifies. Only for an operator's recovery after a restore
        (``rekey state accept``, ``rekey audit reanchor``): it needs the signing key."""
        ...


def _canonical(value: Any) -> bytes:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def statement_digest(kind: str, subject: str, order: int, body: Mapping[str, Any]) -> bytes:
    """SHA-256 over the canonical statement (what the signature covers)."""
    return hashlib.sha256(
        _canonical({"body": dict(body), "format": FORMAT, "kind": kind, "order": order, "subject": subject})
    ).digest()


def _check(kind: str, subject: str, order: int | None = None) -> None:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"checkpoint kind {kind!r} is not [a-z][a-z0-9-]{{0,31}}")
    if not isinstance(subject, str) or not subject:
        raise ValueError("checkpoint subject must be a non-empty string")
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 0):
        raise ValueError("checkpoint order must be a non-negative integer")


class DirectoryWitness:
    """Checkpoints as files under ``directory``. ``signer`` signs new checkpoints (None: read
    only); ``trusted`` (key id -> public key, see `sealing.signing.pinned_keys`) verifies them.
    The signer's own key is trusted too."""

    def __init__(
        self, directory: Path, signer: Signer | None, trusted: Mapping[str, PublicKey] | None = None
    ) -> None:
        self._dir = Path(directory)
        self._signer = signer
        keys = dict(trusted or {})
        if signer is not None:
            keys[signer.key_id] = signer.public_key
        self._trusted = keys

    @property
    def directory(self) -> Path:
        return self._dir

    def __repr__(self) -> str:
        return f"DirectoryWitness({str(self._dir)!r})"

    def path_of(self, kind: str, subject: str) -> Path:
        _check(kind, subject)
        name = hashlib.sha256(subject.encode("utf-8")).hexdigest()[:40]
        return self._dir / kind / f"{name}.json"

    # ------------------------------------------------------------------ reading

    def _read(self, path: Path) -> bytes | None:
        try:
            fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise WitnessError(f"cannot read freshness checkpoint {path}: {exc.strerror}") from None
        try:
            data = os.read(fd, MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_FILE_BYTES:
            raise WitnessError(f"freshness checkpoint {path} is too large")
        return data

    def _parse(self, path: Path, data: bytes, kind: str, subject: str) -> Checkpoint:
        def bad(why: str) -> WitnessError:
            return WitnessError(f"freshness checkpoint {path} {why}")

        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise bad("is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("statement"), dict):
            raise bad("is not a checkpoint")
        st = doc["statement"]
        key_id, signature = doc.get("key_id"), doc.get("signature")
        order, body = st.get("order"), st.get("body")
        if (
            st.get("format") != FORMAT
            or not isinstance(key_id, str)
            or not isinstance(signature, str)
            or isinstance(order, bool)
            or not isinstance(order, int)
            or order < 0
            or not isinstance(body, dict)
        ):
            raise bad("is not a checkpoint of format 1")
        if st.get("kind") != kind or st.get("subject") != subject:
            raise bad("belongs to another subject (copied or moved)")
        key = self._trusted.get(key_id)
        if key is None:
            raise bad(f"is signed by key {key_id[:16]!r}, which is not pinned")
        try:
            sig = bytes.fromhex(signature)
        except ValueError:
            raise bad("has a malformed signature") from None
        if not verify_digest(key, sig, statement_digest(kind, subject, order, body)):
            raise bad("has a bad signature (edited or forged)")
        return Checkpoint(kind, subject, order, body, key_id)

    def latest(self, kind: str, subject: str) -> Checkpoint | None:
        path = self.path_of(kind, subject)
        data = self._read(path)
        return None if data is None else self._parse(path, data, kind, subject)

    # ------------------------------------------------------------------ writing

    def _mkdirs(self, directory: Path) -> None:
        for level in (self._dir, directory):  # both 0700: parents=True would not apply the mode
            try:
                level.parent.mkdir(parents=True, exist_ok=True)
                level.mkdir(mode=0o700, exist_ok=True)
            except OSError as exc:
                raise WitnessError(f"cannot create the witness directory {level}: {exc.strerror}") from None
            if level.is_symlink() or not level.is_dir():
                raise WitnessError(f"the witness directory {level} is not a directory")

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        lock = path.with_name(path.name + ".lock")
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o600)
        except OSError as exc:
            raise WitnessError(f"cannot lock freshness checkpoint {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise WitnessError(f"cannot write freshness checkpoint {path}: {exc.strerror}") from None

    def _replace(
        self, kind: str, subject: str, order: int, body: Mapping[str, Any], *, force: bool
    ) -> Checkpoint:
        _check(kind, subject, order)
        signer = self._signer
        if signer is None:
            raise WitnessError("this witness was opened without a signing key; it can only be read")
        clean = json.loads(_canonical(dict(body)))  # JSON values only, as read back
        path = self.path_of(kind, subject)
        self._mkdirs(path.parent)
        with self._locked(path):
            if not force:
                data = self._read(path)
                current = None if data is None else self._parse(path, data, kind, subject)
                if current is not None and current.order >= order:
                    return current
            signature = signer.sign(statement_digest(kind, subject, order, clean))
            statement = {"body": clean, "format": FORMAT, "kind": kind, "order": order, "subject": subject}
            doc = {"key_id": signer.key_id, "signature": signature.hex(), "statement": statement}
            self._write(path, _canonical(doc))
        return Checkpoint(kind, subject, order, clean, signer.key_id)

    def advance(self, kind: str, subject: str, order: int, body: Mapping[str, Any]) -> Checkpoint:
        return self._replace(kind, subject, order, body, force=False)

    def reset(self, kind: str, subject: str, order: int, body: Mapping[str, Any]) -> Checkpoint:
        return self._replace(kind, subject, order, body, force=True)
