"""The Transit adapter's fast ciphertext-version parser agrees with the reference parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kms_adapters.errors import InvalidCiphertext
from kms_adapters.vault_transit import VaultTransitAdapter
from sealing.errors import InvalidWrappedKey
from sealing.keywrap import parse_versioned_prefix


def _reference(wrapped: bytes) -> int | None:
    try:
        return parse_versioned_prefix(wrapped, "vault")[0]
    except InvalidWrappedKey:
        return None


def _fast(wrapped: bytes) -> int | None:
    try:
        return VaultTransitAdapter.version_of(None, wrapped)  # type: ignore[arg-type]
    except InvalidCiphertext:
        return None


@pytest.mark.parametrize(
    "wrapped",
    [
        b"vault:v1:abc",
        b"vault:v1234567890:x",
        b"vault:v1:",
        b"vault:v0:abc",
        b"vault:v01:x",
        b"vault:v12345678901:x",
        b"vault:v:x",
        b"vault:v1",
        b"vault:v123",
        b"vault:vx:1",
        b"aws:v1:x",
        b"vault:v+1:x",
        b"vault:v 1:x",
        b"vault:v\xd9\xa1:x",
        b"",
    ],
)
def test_known_forms(wrapped: bytes) -> None:
    assert _fast(wrapped) == _reference(wrapped)


@given(st.binary(max_size=24).map(lambda tail: b"vault:v" + tail) | st.binary(max_size=24))
def test_agrees_with_the_reference_parser(wrapped: bytes) -> None:
    assert _fast(wrapped) == _reference(wrapped)
