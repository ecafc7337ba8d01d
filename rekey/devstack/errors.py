"""The dev stack's errors: each message is one line meant for the user."""

from __future__ import annotations

__all__ = ["BinaryMissing", "ComponentFailed", "DevStackError", "PortInUse", "one_line"]


class DevStackError(Exception):
    """A dev-stack operation failed; the message is one line meant for the user."""

    exit_code = 1


class PortInUse(DevStackError):
    """A port a component needs is taken by some other process."""


class ComponentFailed(DevStackError):
    """A component exited early, did not become ready in time, or failed its setup."""


class BinaryMissing(DevStackError):
    """The executable of a component is neither in this environment nor on PATH."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, at most about 300 characters."""
    text = " ".join(str(exc).split())
    return text[:300] + ("..." if len(text) > 300 else "")
