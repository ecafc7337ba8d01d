"""What every part of the emulator shares about Key Vault's wire format: the error answer, base64url
and Unix seconds."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["ApiError", "b64u", "int_bytes", "key_not_found", "unb64u", "unix_now"]


class ApiError(Exception):
    """An error answer in Key Vault's shape: ``{"error": {"code": ..., "message": ...}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        inner: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.inner = inner
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


def key_not_found(name: str, version: str = "") -> ApiError:
    what = f"{name}/{version}" if version else name
    return ApiError(
        404,
        "KeyNotFound",
        f"A key with (name/id) {what} was not found in this key vault. If you recently deleted this "
        "key you may be able to recover it using the correct recovery command.",
    )


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: object, what: str) -> bytes:
    """Decode a base64url field of a request; ``what`` names it in the 400 answer."""
    if not isinstance(text, str):
        raise ApiError(400, "BadParameter", f"{what} must be a base64url string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(400, "BadParameter", f"{what} is not valid base64url") from None


def int_bytes(value: int) -> bytes:
    """Big-endian bytes of a JWK integer (``n``, ``e``, ``d``, ...), at least one byte."""
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def unix_now() -> int:
    """Whole Unix seconds, as Key Vault sends ``created`` and ``updated``."""
    return int(time.time())
