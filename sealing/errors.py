"""Typed errors of the sealing layer.

Every failure to open a sealed blob is one of these, never a bare ``ValueError``,
``struct.error`` or ``cryptography`` exception, so callers (and the CLI) can tell an
operator *what* is wrong: the blob was cut short, is not a format we read, was altered,
or names a key version the KMS no longer has. Messages never contain key material or
sealed data.
"""

from __future__ import annotations


class SealingError(Exception):
    """Base class of every sealing-layer error."""

    exit_code = 1


class SealedBlobError(SealingError):
    """A sealed blob could not be opened."""


class TruncatedBlob(SealedBlobError):
    """The blob ends before the length fields say it should."""


class UnsupportedFormat(SealedBlobError):
    """Not a rekey sealed blob, or a format version or feature this build does not read."""


class TamperedBlob(SealedBlobError):
    """Authentication failed: a header byte, the key slot, the nonce or the body was altered."""


class UnknownKeyVersion(SealedBlobError):
    """The blob's DEK is wrapped under a key version the KMS does not have (or no longer has)."""


class KeyWrapError(SealingError):
    """The key wrapper could not wrap, unwrap or re-wrap a DEK.

    ``retryable``: a later identical call may succeed. The re-wrap sweep branches on it (a
    retryable error ends the attempt for the caller to retry; any other fails only that blob)."""

    retryable = False


class UnknownKey(KeyWrapError):
    """The key reference names a key that does not exist."""

    exit_code = 2  # bad input: name a key that exists (rekey key create)


class InvalidWrappedKey(KeyWrapError):
    """The wrapped DEK is not a valid ciphertext for this key."""


class KeyServiceUnavailable(KeyWrapError):
    """The KMS could not be reached or answered with a server error."""

    retryable = True


class StaleBlob(TamperedBlob):
    """The stored blob is older than its freshness checkpoint (a row restored from a backup or
    an older generation, or a deleted blob put back): its authenticated version is below the
    checkpoint's, or it is not the blob the checkpoint names. Names the item and versions only."""
