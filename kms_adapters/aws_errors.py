"""AWS KMS errors (boto3/botocore) mapped onto the rekey error taxonomy.

Whether a failure may have been applied decides what the governor may resend: a throttle or a
connection that was never made is safe to resend; a 5xx, a read timeout or a closed connection
after the request went out is `AnswerLost` (kms_adapters/errors.py)."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    KmsError,
    NotFound,
    PermissionDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)

_THROTTLE_CODES = frozenset(
    {"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded"}
)
_UNAVAILABLE_CODES = frozenset(
    {
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "IncompleteSignature",
        "MissingAuthenticationToken",
    }
)
_CRYPTO_OPS = frozenset({"encrypt", "decrypt", "re_encrypt"})
# What KMS (and moto) say when a ciphertext belongs to another key than the one named.
_FOREIGN_CIPHERTEXT = "ciphertext refers to a customer master key"


class AlreadyExists(InvalidRequest):
    """An alias (or key) of that name exists already; create/rotate handle it."""


def map_aws_error(exc: Exception, op: str, key_ref: str) -> KmsError:
    """Translate a boto3/botocore exception from SDK operation ``op`` into the taxonomy."""
    action = op.replace("_", " ")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", "") or "")
        meta = exc.response.get("ResponseMetadata", {})
        status = int(meta.get("HTTPStatusCode", 0) or 0)
        if code in _THROTTLE_CODES or (code == "LimitExceededException" and "rate" in message.lower()):
            return Throttled(f"AWS KMS throttled {action} on {key_ref}", _retry_after(meta))
        if code == "LimitExceededException":
            return InvalidRequest(
                f"AWS KMS refused {action} on {key_ref}: an account or key quota is exhausted"
                " (keys, aliases or on-demand rotations)"
            )
        if code in _UNAVAILABLE_CODES or status >= 500:  # the server may have applied it first
            return AnswerLost(
                f"AWS KMS failed to {action} on {key_ref} ({code or status}):"
                " the request may have been applied"
            )
        if code == "NotFoundException":
            return NotFound(f"AWS KMS has no key for {key_ref} (or one of its versions)")
        if code == "DisabledException" or (code == "KMSInvalidStateException" and op in _CRYPTO_OPS):
            return VersionDisabled(f"the KMS key for {key_ref} is disabled or scheduled for deletion")
        if code == "KMSInvalidStateException":
            return InvalidRequest(f"AWS KMS refused {action} on {key_ref}: not allowed in the key's state")
        if code in ("InvalidCiphertextException", "IncorrectKeyException"):
            return InvalidCiphertext(f"wrapped key is not a valid ciphertext of {key_ref}")
        if (
            code == "AccessDeniedException"
            and op in _CRYPTO_OPS
            and (not message or _FOREIGN_CIPHERTEXT in message)
        ):
            # The ciphertext names another key than the one we passed (real KMS: IncorrectKeyException
            # or this message; moto sends AccessDeniedException with its message dropped).
            return InvalidCiphertext(f"wrapped key is not a ciphertext of {key_ref}'s key for that version")
        if code in _CREDENTIAL_CODES:
            return PermissionDenied(
                f"AWS KMS denied {action} on {key_ref} (check credentials and key policy)"
            )
        if code == "AlreadyExistsException":
            return AlreadyExists(f"AWS KMS: an alias for {key_ref} exists already")
        return InvalidRequest(f"AWS KMS refused {action} on {key_ref} ({code or status})")
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)):
        return PermissionDenied(f"no usable AWS credentials to {action} on {key_ref}")
    if isinstance(exc, ParamValidationError):
        return InvalidRequest(f"invalid request to {action} on {key_ref}")
    if isinstance(exc, BotoConnectionError):  # refused, DNS, connect timeout, TLS handshake: not sent
        return Unavailable(f"cannot reach AWS KMS to {action} on {key_ref} ({type(exc).__name__})")
    if isinstance(exc, HTTPClientError | BotoCoreError):  # read timeout, closed, unparsable answer
        return AnswerLost(
            f"no answer from AWS KMS to {action} on {key_ref} ({type(exc).__name__}):"
            " the request may have been applied"
        )
    return KmsError(f"unexpected failure to {action} on {key_ref} ({type(exc).__name__})")


def _retry_after(meta: dict[str, Any]) -> float | None:
    headers = meta.get("HTTPHeaders") or {}
    try:
        value = headers.get("retry-after")
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def is_throttle_code(code: str) -> bool:
    """An AWS error code that means "refused for rate"."""
    return code in _THROTTLE_CODES
