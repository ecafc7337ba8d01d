"""The audit log's error type."""

from __future__ import annotations

__all__ = ["AuditError"]


class AuditError(Exception):
    """The audit log or its keys cannot be used (one-line message, never key material)."""

    exit_code = 1
