"""Transit-specific behaviour of the Vault/OpenBao adapter against a real OpenBao.

(The behaviour every backend shares is in test_kms_contract.py.)"""

from __future__ import annotations

import secrets

import hvac
import pytest

from kms_adapters.errors import (
    InvalidCiphertext,
    NotFound,
    PermissionDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import BATCH_ITEMS, VaultTransitAdapter
from sealing.envelope import open_blob, parse, rewrap, seal
from sealing.errors import TamperedBlob, UnknownKeyVersion
from tests.fixtures.openbao import OpenBao
from tests.fixtures.ports import free_port

pytestmark = pytest.mark.integration


def adapter(client: hvac.Client, name: str | None = None) -> VaultTransitAdapter:
    return VaultTransitAdapter(
        client,
        name or f"k-{secrets.token_hex(4)}",
        release_store=MemoryReleasePolicyStore(),
        governor=Governor(f"test-{secrets.token_hex(4)}"),
    )


@pytest.fixture
def key(openbao: OpenBao) -> VaultTransitAdapter:
    created = adapter(openbao.client())
    created.create()
    return created


def test_envelope_over_transit(key: VaultTransitAdapter) -> None:
    blob = seal(b"sealed state", key, namespace="ns", name="a", generation="g1")
    assert parse(blob).header.key_ref == key.key_ref
    key.rotate()
    moved = rewrap(blob, key)
    assert parse(moved).key_version == 2
    assert open_blob(moved, key) == b"sealed state"
    key.disable_version(1)
    with pytest.raises(UnknownKeyVersion, match="disabled"):
        open_blob(blob, key)
    assert open_blob(moved, key) == b"sealed state"


def test_tampered_wrapped_dek_in_blob_is_typed(key: VaultTransitAdapter) -> None:
    blob = bytearray(seal(b"x", key, namespace="ns", name="a", generation="g"))
    index = blob.index(b"vault:v1:") + 20
    blob[index] = ord("A") if blob[index] != ord("A") else ord("B")
    with pytest.raises(TamperedBlob):
        open_blob(bytes(blob), key)


def test_batch_rewrap_splits_requests_and_reports_items(key: VaultTransitAdapter) -> None:
    count = BATCH_ITEMS * 2 + 7  # three requests
    deks = [secrets.token_bytes(32) for _ in range(count)]
    wrapped = [key.wrap(d).ciphertext for d in deks]
    key.rotate()
    items = list(wrapped)
    items[5] = b"garbage"
    items[BATCH_ITEMS + 3] = wrapped[0].replace(b"vault:v1:", b"vault:v9:")
    outcomes = key.rewrap_batch(items)
    assert [o.index for o in outcomes] == list(range(count))
    assert isinstance(outcomes[5].error, InvalidCiphertext)
    assert isinstance(outcomes[BATCH_ITEMS + 3].error, InvalidCiphertext)
    good = [o for o in outcomes if o.wrapped is not None]
    assert len(good) == count - 2 and all(o.wrapped.key_version == 2 for o in good)  # type: ignore[union-attr]
    assert key.unwrap(outcomes[-1].wrapped.ciphertext) == deks[-1]  # type: ignore[union-attr]


def test_destroy_trims_and_states(key: VaultTransitAdapter) -> None:
    old = key.wrap(b"\x07" * 32).ciphertext
    key.rotate()
    key.rotate()
    info = key.destroy_below(3)
    assert [(v.version, v.state) for v in info.versions] == [
        (1, "destroyed"),
        (2, "destroyed"),
        (3, "enabled"),
    ]
    assert info.primary_version == 3
    with pytest.raises(VersionDisabled):
        key.unwrap(old)


def test_a_rotation_after_a_destroy_can_retire(key: VaultTransitAdapter) -> None:
    """destroy_below pins min_encryption_version; disabling above it later used to be refused
    ("min encryption version of 2 must be greater than or equal to min decryption version of 3"),
    so the next rotation of the key blocked in RETIRING for ever."""
    key.rotate()
    key.destroy_below(2)
    key.rotate()
    info = key.disable_version(2)
    assert [(v.version, v.state) for v in info.versions] == [
        (1, "destroyed"),
        (2, "disabled"),
        (3, "enabled"),
    ]
    assert key.enable_version(2).state_of(2) == "enabled"
    assert key.unwrap(key.wrap(b"\x01" * 32).ciphertext) == b"\x01" * 32


def test_typed_errors(key: VaultTransitAdapter, openbao: OpenBao) -> None:
    missing = adapter(openbao.client(), "no-such-key")
    with pytest.raises(NotFound, match="no-such-key"):
        missing.wrap(b"\x00" * 32)  # and Transit's create-on-encrypt did not create it:
    with pytest.raises(NotFound):
        missing.describe()
    with pytest.raises(PermissionDenied):
        adapter(hvac.Client(url=openbao.addr, token="wrong"), key.name).wrap(b"\x00" * 32)
    dead = hvac.Client(url=f"http://127.0.0.1:{free_port()}", token="x", timeout=2)
    with pytest.raises(Unavailable, match="cannot reach"):
        VaultTransitAdapter(
            dead, "k", release_store=MemoryReleasePolicyStore(), governor=Governor("dead", max_attempts=1)
        ).wrap(b"\x00" * 32)


def test_rate_limit_quota_is_throttled(openbao: OpenBao) -> None:
    """OpenBao throttles natively; without retries the adapter reports Throttled."""
    client = openbao.client()
    name = f"rl-{secrets.token_hex(3)}"
    path = f"transit/encrypt/{name}"
    client.adapter.post(f"/v1/sys/quotas/rate-limit/{name}", json={"path": path, "rate": 1, "interval": "1s"})
    try:
        key = VaultTransitAdapter(
            client,
            name,
            release_store=MemoryReleasePolicyStore(),
            governor=Governor(f"rl-{name}", max_attempts=1),
        )
        key.create()
        with pytest.raises(Throttled):
            for _ in range(20):
                key.wrap(b"\x01" * 32)
    finally:
        client.adapter.delete(f"/v1/sys/quotas/rate-limit/{name}")
