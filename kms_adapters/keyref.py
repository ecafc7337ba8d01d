"""Key references: ``backend:name`` (``vault:orders``, ``aws:team/orders``, ``azure:orders``).

A key reference may come from the store (a record's ``key_ref`` chooses the wrapper before the
blob is authenticated), so its name is held to a safe alphabet that can never address anything
but a key of its backend once it is put into a URL path, an alias or an ARN:

- a *segment* is 1+ of ``[A-Za-z0-9_-]`` starting with a letter or digit, with single dots only
  between such runs where the backend allows dots (``orders``, ``orders-2.v1``); so never a
  segment ``.`` or ``..``, no leading or trailing dot, no ``..`` anywhere;
- ``vault``: one segment of at most 128 characters (Transit key names cannot hold ``/``);
- ``aws``: 1+ segments without dots, joined by single ``/`` (AWS alias characters; the alias is
  ``alias/rekey/NAME``), at most 128 characters, no empty segment, no leading or trailing ``/``;
- ``azure``: ``[0-9a-z-]``, 1-127 characters (Key Vault key names, which ignore case: upper case is
  refused so that one key has one reference).

Everything is matched with ``fullmatch`` (a trailing newline does not pass). ``InvalidKeyRef``
carries a one-line message that shows the refused text with ``repr``, cut to its first 80
characters (a hostile reference may be megabytes long).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKENDS = ("vault", "aws", "azure")

_RUN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
_DOTTED_SEGMENT = rf"{_RUN}(?:\.[A-Za-z0-9_-]+)*"
MAX_NAME = 128

_NAMES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "vault": (
        re.compile(_DOTTED_SEGMENT),
        MAX_NAME,
        "1-128 of letters, digits, _ - and inner single dots, starting with a letter or digit",
    ),
    "aws": (
        re.compile(rf"{_RUN}(?:/{_RUN})*"),
        MAX_NAME,
        "1-128 of letters, digits, _ - in segments separated by single '/', each starting with"
        " a letter or digit",
    ),
    # Key Vault names are case-insensitive: one key must have one reference (and one rotation
    # id), so only lower case is accepted (`azure:Orders` and `azure:orders` are the same key).
    "azure": (
        re.compile(r"[0-9a-z-]+"),
        127,
        "1-127 of lower-case letters, digits and - (Key Vault names ignore case)",
    ),
}


def _shown(text: str) -> str:
    """``text`` for a message: its repr, of at most its first 80 characters."""
    return repr(text[:80]) + f" (cut, {len(text)} characters)" if len(text) > 80 else repr(text)


class InvalidKeyRef(ValueError):
    """A key reference is not ``backend:name`` with a known backend and a safe name."""

    exit_code = 2


def check_name(backend: str, name: str) -> str:
    """``name`` if it is a safe key name for ``backend``; else ``InvalidKeyRef``."""
    pattern, limit, rule = _NAMES[backend]
    if not (len(name) <= limit and pattern.fullmatch(name)):
        raise InvalidKeyRef(f"key reference {_shown(f'{backend}:{name}')}: name must be {rule}")
    return name


@dataclass(frozen=True)
class KeyRef:
    backend: str
    name: str

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            known = ", ".join(BACKENDS)
            raise InvalidKeyRef(
                f"key reference {_shown(str(self))}: unknown backend {_shown(self.backend)} (one of {known})"
            )
        check_name(self.backend, self.name)

    @classmethod
    def parse(cls, text: str) -> KeyRef:
        if not isinstance(text, str):
            raise InvalidKeyRef(f"key reference must be text, not {type(text).__name__}")
        backend, sep, name = text.partition(":")
        if not sep:
            raise InvalidKeyRef(
                f"key reference {_shown(text)} must look like backend:name (e.g. vault:orders)"
            )
        return cls(backend, name)

    def __str__(self) -> str:
        return f"{self.backend}:{self.name}"
