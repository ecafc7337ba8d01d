"""The audit log's key files: the Ed25519 signing key (PKCS#8 PEM, mode 0600, created exclusively,
never overwritten) and its public key beside it, so that verifying needs no private key. See
docs/audit-log-format.md."""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from audit.errors import AuditError
from audit.format import key_id_of
from sealing.private_file import PrivateFileError, PrivateFileMissing, read_private
from sealing.signing import PublicKey, SigningError, load_public_key_pem
from sealing.signing import key_id_of as any_key_id_of

__all__ = [
    "AUDIT_DIR",
    "PUBLIC_KEY_SUFFIX",
    "SIGNING_KEY_FILE",
    "audit_dir",
    "default_signing_key_path",
    "found_public_keys",
    "load_or_create_signing_key",
    "load_public_key",
    "load_signing_key",
    "public_key_path_for",
    "trusted_public_keys",
]

AUDIT_DIR: Final = "audit"
SIGNING_KEY_FILE: Final = "ed25519.pem"
PUBLIC_KEY_SUFFIX: Final = ".pub.pem"


def audit_dir(home: Path) -> Path:
    return Path(home) / AUDIT_DIR


def default_signing_key_path(home: Path) -> Path:
    """``<home>/audit/ed25519.pem``."""
    return audit_dir(home) / SIGNING_KEY_FILE


def public_key_path_for(private_key_path: Path) -> Path:
    """``ed25519.pem`` -> ``ed25519.pub.pem`` beside it."""
    path = Path(private_key_path)
    return path.with_name(path.name.removesuffix(".pem") + PUBLIC_KEY_SUFFIX)


def _public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _write_fd(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


_EXCL_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)


def _create_exclusive(path: Path, data: bytes, mode: int) -> bool:
    """Create ``path`` holding ``data`` with ``mode``; False if it exists already. Never
    overwrites or follows a symlink planted there. The file appears complete or not at all:
    written to a temporary file (O_EXCL) and hard-linked into place, which fails if the name
    is taken. Falls back to O_EXCL on the name itself where hard links are not supported."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, _EXCL_FLAGS, mode)
    try:
        try:
            os.fchmod(fd, mode)  # in case the umask or a default ACL changed it
            _write_fd(fd, data)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path, follow_symlinks=False)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        else:
            return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        fd = os.open(path, _EXCL_FLAGS, mode)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, mode)
        _write_fd(fd, data)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
    return True


def _write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    """Write (or correct) the public key file, atomically (temporary file + rename)."""
    data = _public_pem(key)
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, _EXCL_FLAGS, 0o644)
    try:
        try:
            _write_fd(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _keep_old_public_key(path: Path, key: Ed25519PublicKey) -> Path | None:
    """If the public key file at ``path`` holds another valid key than ``key`` (the signing key
    was lost or replaced), keep that one as ``<key id>.pub.pem`` beside it, created exclusively
    (an existing copy is never overwritten), so that records and checkpoints it signed can
    still be verified once its fingerprint is pinned. Returns the copy's path, if any."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        old = load_public_key_pem(data, "old audit public key")
    except SigningError:
        return None  # not a key: nothing worth keeping
    if any_key_id_of(old) == any_key_id_of(key):
        return None
    kept = path.with_name(any_key_id_of(old) + PUBLIC_KEY_SUFFIX)
    _create_exclusive(kept, data, 0o644)  # False: already kept
    return kept


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PKCS#8 PEM file at ``path``. FileNotFoundError if
    there is none; `AuditError` if it cannot be read or is not an Ed25519 key."""
    path = Path(path)
    try:  # no symlink followed; a regular file of ours, mode 0600, checked on the opened file
        data = read_private(path, limit=64 * 1024)
    except PrivateFileMissing:
        raise FileNotFoundError(path) from None
    except PrivateFileError as exc:
        raise AuditError(f"the audit signing key: {exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # cryptography's messages name the problem, never the key material
        raise AuditError(f"cannot load the audit signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditError(f"the audit signing key {path} is not an Ed25519 key")
    return key


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the signing key at ``path``, or generate one there (PKCS#8 PEM, mode 0600, created
    exclusively; parent directories mode 0700). If another process creates it first, its key
    is loaded. The public key is (re)written beside it as ``<name>.pub.pem``; if that file held
    another key (the old one of a lost or replaced signing key), it is first kept as
    ``<key id>.pub.pem`` (never overwritten): pin its fingerprint to keep verifying what it
    signed."""
    path = Path(path)
    try:
        key = load_signing_key(path)
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            if not _create_exclusive(path, pem, 0o600):
                key = load_signing_key(path)  # another process won the race
        except OSError as exc:
            raise AuditError(f"cannot create the audit signing key {path}: {exc.strerror}") from None
    try:
        _keep_old_public_key(public_key_path_for(path), key.public_key())
        _write_public_key(public_key_path_for(path), key.public_key())
    except OSError as exc:
        raise AuditError(f"cannot write the audit public key beside {path}: {exc.strerror}") from None
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file."""
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise AuditError(f"cannot read the audit public key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise AuditError(f"cannot load the audit public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditError(f"the audit public key {path} is not an Ed25519 key")
    return key


def found_public_keys(home: Path, paths: Iterable[Path] = ()) -> dict[str, PublicKey]:
    """Key id -> Ed25519 or P-256 public key for ``paths``, or, if none are given, for every
    ``*.pub.pem`` in ``<home>/audit/``. These are *candidates*, not trusted keys: anyone who can
    write that directory can plant a file there, so `rekey audit verify` trusts one only if
    its fingerprint is pinned (`sealing.signing.pinned_keys`)."""
    chosen = list(paths)
    if not chosen:
        directory = audit_dir(home)
        chosen = sorted(directory.glob(f"*{PUBLIC_KEY_SUFFIX}")) if directory.is_dir() else []
    keys: dict[str, PublicKey] = {}
    for path in chosen:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read the audit public key {path}: {exc.strerror}") from None
        try:
            key = load_public_key_pem(data, f"audit public key {path}")
        except SigningError as exc:
            raise AuditError(str(exc)) from None
        keys[any_key_id_of(key)] = key
    return keys


def trusted_public_keys(home: Path, paths: Iterable[Path] = ()) -> dict[str, Ed25519PublicKey]:
    """Key id -> public key for ``paths``, or, if none are given, for every ``*.pub.pem`` in
    ``<home>/audit/`` (this installation's key and any others copied there). For tests and
    tools that trust their own directory; `rekey audit verify` pins keys instead
    (`found_public_keys`)."""
    chosen = list(paths)
    if not chosen:
        directory = audit_dir(home)
        chosen = sorted(directory.glob(f"*{PUBLIC_KEY_SUFFIX}")) if directory.is_dir() else []
    keys: dict[str, Ed25519PublicKey] = {}
    for path in chosen:
        key = load_public_key(path)
        keys[key_id_of(key)] = key
    return keys
