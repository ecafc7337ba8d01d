"""One error taxonomy for every KMS backend.

Each adapter maps its SDK's errors onto these; each error says whether it is retryable, so
the governor retries only what can succeed later and Temporal activities mark the rest
``non_retryable``. The classes also derive from the sealing layer's errors, so the envelope
code (which knows ``InvalidWrappedKey``, ``UnknownKeyVersion`` ...) works with any adapter.
"""

from __future__ import annotations

from sealing.errors import (
    InvalidWrappedKey,
    KeyServiceUnavailable,
    KeyWrapError,
    UnknownKey,
    UnknownKeyVersion,
)


class KmsError(KeyWrapError):
    """Base of the taxonomy. ``retryable``: a later identical call may succeed."""

    retryable = False


class Throttled(KmsError, KeyServiceUnavailable):
    """The KMS refused for rate: HTTP 429, AWS ThrottlingException. ``retry_after`` if the server said."""

    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(KmsError, KeyServiceUnavailable):
    """Cannot reach the KMS, a 5xx, or the governor's circuit is open."""

    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AnswerLost(Unavailable):
    """The request was sent but no usable answer came back (a read timeout, the connection reset
    or closed after sending, a 5xx, an unreadable answer): the KMS may have applied it.

    Adapters raise it instead of a plain ``Unavailable`` whenever the request may have reached
    the server; a plain ``Unavailable`` means it was not sent (connection refused, DNS, a failed
    TLS handshake, an open circuit). The governor resends an idempotent call after it as after any
    ``Unavailable``, but never a non-idempotent one (``Governor.call(..., idempotent=False)``):
    the caller must read the key's state to learn whether the mutation took effect."""


class NotFound(KmsError, UnknownKey):
    """The key does not exist."""


class PermissionDenied(KmsError):
    """The credentials may not do this."""


class PolicyDenied(KmsError):
    """The release gate refused: the attestation result does not satisfy the key's release policy."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        super().__init__("release denied: " + "; ".join(self.reasons))


class InvalidCiphertext(KmsError, InvalidWrappedKey):
    """Not a ciphertext of this key (garbage, altered, or naming a version that never existed)."""


class VersionDisabled(KmsError, UnknownKeyVersion):
    """The ciphertext's key version is disabled, scheduled for deletion or destroyed."""


class InvalidRequest(KmsError):
    """The KMS refused the request as malformed or not allowed in the key's state."""
