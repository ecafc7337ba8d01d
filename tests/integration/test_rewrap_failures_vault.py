"""Every blob a re-wrap sweep fails is recorded in the store, against a real OpenBao Transit and
a real store (SQLite and PostgreSQL): DEKs OpenBao refuses (wrapped under another key) and
blobs that are not sealed blobs, more of them than the sweep's result keeps ids of."""

from __future__ import annotations

import secrets

import pytest

from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from sealing import envelope
from sealing.rotation import MAX_FAILED_IDS, rewrap_range
from sealing.store import NewBlob, SealedStateStore
from tests.fixtures.openbao import OpenBao

pytestmark = pytest.mark.integration


def _adapter(openbao: OpenBao, name: str) -> VaultTransitAdapter:
    adapter = VaultTransitAdapter(
        openbao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(f"fail-{name}")
    )
    adapter.create()
    return adapter


def test_openbao_refusals_and_unreadable_blobs_are_all_recorded(openbao: OpenBao, store_url: str) -> None:
    key = _adapter(openbao, f"fail-{secrets.token_hex(4)}")
    stranger = _adapter(openbao, f"other-{secrets.token_hex(4)}")
    rows: list[NewBlob] = []
    for i in range(15):  # good blobs of the key
        blob = bytes(envelope.seal(b"fine", key, namespace="ns", name=f"good-{i}", generation="g"))
        rows.append(NewBlob("ns", f"good-{i}", key.key_ref, 1, "g", blob))
    for i in range(MAX_FAILED_IDS):  # filed under the key, but their DEKs are wrapped by another
        blob = bytes(envelope.seal(b"misfiled", stranger, namespace="ns", name=f"stray-{i}", generation="g"))
        rows.append(NewBlob("ns", f"stray-{i}", key.key_ref, 1, "g", blob))
    for i in range(7):  # not sealed blobs at all
        rows.append(NewBlob("ns", f"junk-{i}", key.key_ref, 1, "g", b"junk " + bytes([i]) * 40))
    with SealedStateStore(store_url) as store:
        ids = dict(zip((r.name for r in rows), store.insert_many(rows), strict=True))
        key.rotate()
        result = rewrap_range(store, key, below_version=2, start=None, end=None, limit=1000, chunk=9)
        assert (result.rewrapped, result.failed) == (15, MAX_FAILED_IDS + 7)
        assert len(result.failed_ids) == MAX_FAILED_IDS

        failures = {f.blob_id: f for f in store.rewrap_failures(key.key_ref, 2, limit=1000)}
        assert store.count_rewrap_failures(key.key_ref, 2) == len(failures) == MAX_FAILED_IDS + 7
        stray = {ids[f"stray-{i}"] for i in range(MAX_FAILED_IDS)}
        junk = {ids[f"junk-{i}"] for i in range(7)}
        assert set(failures) == stray | junk
        for blob_id in stray:
            reason = failures[blob_id].reason
            assert reason == "InvalidCiphertext: the key service refused to re-wrap the DEK", reason
            assert "vault:" not in reason  # OpenBao's own text (which may echo the input) is not kept
        for blob_id in junk:
            assert failures[blob_id].reason == "UnsupportedFormat: not a rekey sealed blob (bad magic)"
        assert {f.attempts for f in failures.values()} == {1}
