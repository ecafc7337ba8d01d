"""Key references: ``backend:name`` (``vault:orders``, ``aws:alias/orders``, ``azure:orders``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

BACKENDS = ("vault", "aws", "azure")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")


class InvalidKeyRef(ValueError):
    """A key reference is not ``backend:name`` with a known backend."""

    exit_code = 2


@dataclass(frozen=True)
class KeyRef:
    backend: str
    name: str

    @classmethod
    def parse(cls, text: str) -> KeyRef:
        backend, sep, name = text.partition(":")
        if not sep:
            raise InvalidKeyRef(f"key reference {text!r} must look like backend:name (e.g. vault:orders)")
        if backend not in BACKENDS:
            raise InvalidKeyRef(
                f"key reference {text!r}: unknown backend {backend!r} (one of {', '.join(BACKENDS)})"
            )
        if not _NAME.match(name):
            raise InvalidKeyRef(f"key reference {text!r}: name must be 1-128 of letters, digits, _ . / -")
        return cls(backend, name)

    def __str__(self) -> str:
        return f"{self.backend}:{self.name}"
