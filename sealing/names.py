"""The names sealed state is stored under: namespaces, item names and generation ids.

A namespace or an item name is 1 to `MAX_NAME_CHARS` characters of ``A-Z a-z 0-9 . _ -``
starting with a letter, digit or ``_`` (so never ``.``, ``..``, a hidden file's name or
something a command line would read as an option). A generation id is 1 to 128 of
``A-Z a-z 0-9 . _ : -`` starting with a letter or digit (the manifest's ``id``,
`sealing.generation`). An agent id (the fleet registry's key) is 1 to `MAX_AGENT_ID_CHARS` of
``A-Z a-z 0-9 . _ : @ -`` starting with a letter or digit (the default,
``<generation id>@<host id>``, always fits); a host id 1 to 64 of ``a-z 0-9 . _ -`` starting with
a letter or digit. Names end up in table rows, file names, witness subjects and audit
records: no separator, control character, whitespace or path segment fits in them.

Every place a name enters checks it (`SealedState`, the store's writes, the CLI), with
`InvalidName` (exit 2). Rows stored before the rule with other names stay readable by blob id
(rotation sweeps, ``state list``); asking for one by such a name is refused at input.
"""

from __future__ import annotations

import re
from typing import Final

from sealing.errors import SealingError

__all__ = [
    "MAX_AGENT_ID_CHARS",
    "MAX_NAME_CHARS",
    "InvalidName",
    "check_agent_id",
    "check_generation_id",
    "check_host_id",
    "check_name",
    "check_namespace",
    "is_valid_name",
]

MAX_NAME_CHARS: Final = 128
MAX_AGENT_ID_CHARS: Final = 200

_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_GENERATION_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_AGENT_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}")
_HOST_ID: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class InvalidName(SealingError, ValueError):
    """A namespace, item name or generation id outside the allowed alphabet or length."""

    exit_code = 2


def _shown(value: str) -> str:
    # Never the whole of a long value in a one-line message; repr escapes newlines.
    return repr(value[:40] + "…") if len(value) > 40 else repr(value)


def _check(kind: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{kind} must be a string, got {type(value).__name__}")
    if pattern.fullmatch(value) is None:
        length = f" ({len(value)} characters)" if len(value) > MAX_NAME_CHARS else ""
        raise InvalidName(f"invalid {kind} {_shown(value)}{length}: {rule}")
    return value


_NAME_RULE: Final = f"1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ -, starting with a letter, digit or _"


def check_namespace(value: object) -> str:
    """``value`` if it is an allowed namespace, else `InvalidName`."""
    return _check("namespace", value, _NAME, _NAME_RULE)


def check_name(value: object) -> str:
    """``value`` if it is an allowed item name, else `InvalidName`."""
    return _check("name", value, _NAME, _NAME_RULE)


def is_valid_name(value: str) -> bool:
    """Whether ``value`` is an allowed item name (as `check_name`, without raising)."""
    return _NAME.fullmatch(value) is not None


def check_generation_id(value: object) -> str:
    """``value`` if it is an allowed generation id, else `InvalidName`."""
    return _check(
        "generation id",
        value,
        _GENERATION_ID,
        "1-128 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit",
    )


def check_agent_id(value: object) -> str:
    """``value`` if it is an allowed agent id (the fleet registry's key), else `InvalidName`."""
    return _check(
        "agent id",
        value,
        _AGENT_ID,
        f"1-{MAX_AGENT_ID_CHARS} characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit",
    )


def check_host_id(value: object) -> str:
    """``value`` if it is an allowed host id, else `InvalidName`."""
    return _check(
        "host id", value, _HOST_ID, "1-64 characters of a-z 0-9 . _ -, starting with a letter or digit"
    )
