"""The Transit key wrapper and the envelope against a real OpenBao."""

from __future__ import annotations

import secrets

import hvac
import pytest

from kms_adapters.vault_transit import KeyPermissionDenied, TransitAdmin, TransitKeyWrapper
from sealing.envelope import open_blob, parse, rewrap, seal
from sealing.errors import (
    InvalidWrappedKey,
    KeyServiceUnavailable,
    TamperedBlob,
    UnknownKey,
    UnknownKeyVersion,
)
from tests.fixtures.openbao import OpenBao
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def key(openbao: OpenBao) -> tuple[TransitAdmin, TransitKeyWrapper, str]:
    name = f"k-{secrets.token_hex(4)}"
    client = openbao.client()
    admin = TransitAdmin(client)
    admin.create(name)
    return admin, TransitKeyWrapper(client, name), name


def test_create_is_idempotent(openbao: OpenBao) -> None:
    admin = TransitAdmin(openbao.client())
    info, created = admin.create("idem")
    again, created_again = admin.create("idem")
    assert (created, created_again) == (True, False)
    assert info.versions == again.versions == (1,)


def test_wrap_unwrap_rotate_rewrap(key: tuple[TransitAdmin, TransitKeyWrapper, str]) -> None:
    admin, wrapper, name = key
    dek = secrets.token_bytes(32)
    wrapped = wrapper.wrap(dek)
    assert wrapped.key_version == 1 and wrapped.ciphertext.startswith(b"vault:v1:")
    assert wrapper.unwrap(wrapped.ciphertext) == dek
    info = admin.rotate(name)
    assert info.latest_version == 2 and info.versions == (1, 2)
    moved = wrapper.rewrap(wrapped.ciphertext)
    assert moved.key_version == 2
    assert wrapper.unwrap(moved.ciphertext) == dek
    assert wrapper.unwrap(wrapped.ciphertext) == dek  # the old version still decrypts


def test_envelope_over_transit(key: tuple[TransitAdmin, TransitKeyWrapper, str], openbao: OpenBao) -> None:
    admin, wrapper, name = key
    blob = seal(b"sealed state", wrapper, namespace="ns", name="a", generation="g1")
    assert parse(blob).header.key_ref == f"vault:{name}"
    admin.rotate(name)
    moved = rewrap(blob, wrapper)
    assert parse(moved).key_version == 2
    assert open_blob(moved, wrapper) == b"sealed state"
    openbao.client().secrets.transit.update_key_configuration(name=name, min_decryption_version=2)
    with pytest.raises(UnknownKeyVersion, match="disabled"):
        open_blob(blob, wrapper)
    assert open_blob(moved, wrapper) == b"sealed state"


def test_typed_errors(key: tuple[TransitAdmin, TransitKeyWrapper, str], openbao: OpenBao) -> None:
    _, wrapper, _ = key
    good = wrapper.wrap(b"\x01" * 32).ciphertext
    with pytest.raises(UnknownKeyVersion, match="no such version"):
        wrapper.unwrap(good.replace(b"vault:v1:", b"vault:v7:"))
    with pytest.raises(InvalidWrappedKey):
        wrapper.unwrap(good[:-4] + b"AAAA")
    with pytest.raises(InvalidWrappedKey):
        wrapper.unwrap(b"not-a-ciphertext")
    missing = TransitKeyWrapper(openbao.client(), "no-such-key")
    with pytest.raises(UnknownKey, match="no-such-key"):
        missing.wrap(b"\x00" * 32)
    with pytest.raises(UnknownKey):
        missing.unwrap(good)
    # A wrap through a typo'd key ref must not create the key.
    with pytest.raises(UnknownKey):
        TransitAdmin(openbao.client()).describe("no-such-key")


def test_tampered_wrapped_dek_in_blob_is_typed(
    key: tuple[TransitAdmin, TransitKeyWrapper, str],
) -> None:
    _, wrapper, _ = key
    blob = bytearray(seal(b"x", wrapper, namespace="ns", name="a", generation="g"))
    index = blob.index(b"vault:v1:") + 20
    blob[index] = ord("A") if blob[index] != ord("A") else ord("B")
    with pytest.raises(TamperedBlob):
        open_blob(bytes(blob), wrapper)


def test_bad_token_and_unreachable_server(openbao: OpenBao) -> None:
    with pytest.raises(KeyPermissionDenied):
        TransitKeyWrapper(hvac.Client(url=openbao.addr, token="wrong"), "k").wrap(b"\x00" * 32)
    dead = hvac.Client(url=f"http://127.0.0.1:{free_port()}", token="x", timeout=2)
    with pytest.raises(KeyServiceUnavailable, match="cannot reach"):
        TransitKeyWrapper(dead, "k").wrap(b"\x00" * 32)
